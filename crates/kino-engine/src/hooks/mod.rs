//! Step caches (issue 18), mirroring diffusers 0.42.1's hooks with the same configuration
//! names and defaults: [First Block Cache](first_block_cache), [MagCache](mag_cache) and
//! [TaylorSeer](taylorseer_cache).
//!
//! A [`StepCache`] holds one generation's state, one per cache context ("cond" / "uncond", as
//! the reference's `StateManager` keeps one state per `cache_context` name), and counts the
//! transformer forwards it ran and skipped. The Wan transformer calls it from
//! `WanTransformer3DModel::forward_cached`; `WanPipeline::denoise_with` makes a fresh one per
//! generation when `PipelineOptions::cache` is set.
//!
//! The command-line syntax ([`CacheConfig::from_str`]):
//!
//! - `first-block[:THRESHOLD]`
//! - `mag[:THRESHOLD][,max_skip_steps=N][,retention_ratio=R][,num_inference_steps=N]` (the
//!   ratios come from a file, [`read_mag_ratios`]), or `mag:calibrate`
//! - `taylorseer[:INTERVAL][,max_order=N][,disable_cache_before_step=N]`
//!   `[,disable_cache_after_step=N][,cache_identifiers=REGEX][,skip_predict_identifiers=REGEX]`
//!   (identifier keys may repeat; a regex may contain commas)

pub mod first_block_cache;
pub mod mag_cache;
pub mod taylorseer_cache;

use std::collections::HashMap;
use std::str::FromStr;

use candle_core::Tensor;

pub use first_block_cache::FirstBlockCacheConfig;
pub use mag_cache::{nearest_interp, read_mag_ratios, write_mag_ratios, MagCacheConfig};
pub use taylorseer_cache::{Attn, TaylorSeerCacheConfig};

use crate::{Error, Result};

/// One step cache and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheConfig {
    FirstBlock(FirstBlockCacheConfig),
    Mag(MagCacheConfig),
    TaylorSeer(TaylorSeerCacheConfig),
}

const SYNTAX: &str = "use first-block:THRESHOLD, mag:THRESHOLD[,max_skip_steps=N,retention_ratio=R], \
                      mag:calibrate or taylorseer:INTERVAL[,max_order=N,disable_cache_before_step=N,cache_identifiers=REGEX]";

impl CacheConfig {
    /// `first-block`, `mag` or `taylorseer`.
    pub fn name(&self) -> &'static str {
        match self {
            CacheConfig::FirstBlock(_) => "first-block",
            CacheConfig::Mag(_) => "mag",
            CacheConfig::TaylorSeer(_) => "taylorseer",
        }
    }

    /// Gives a MagCache its ratios (an error for the other caches).
    pub fn with_mag_ratios(mut self, ratios: Vec<f32>) -> Result<Self> {
        match &mut self {
            CacheConfig::Mag(m) if m.calibrate => Err(Error::InvalidRequest(
                "mag:calibrate measures the ratios; give no ratio file with it".into(),
            )),
            CacheConfig::Mag(m) => {
                m.mag_ratios = Some(ratios);
                Ok(self)
            }
            _ => Err(Error::InvalidRequest(format!(
                "magnitude ratios apply to the mag cache, not `{}`",
                self.name()
            ))),
        }
    }

    /// Settings that cannot run (MagCache without ratios).
    pub fn validate(&self) -> Result<()> {
        match self {
            CacheConfig::Mag(m) => m.validate(),
            _ => Ok(()),
        }
    }
}

fn bad(spec: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidRequest(format!("cache `{spec}`: {why}; {SYNTAX}"))
}

fn num<T: FromStr>(spec: &str, key: &str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| bad(spec, format!("{key} must be {what}, not `{v}`")))
}

fn fraction(spec: &str, key: &str, v: &str, lo_open: bool) -> Result<f64> {
    let x: f64 = num(spec, key, v, "a number")?;
    if !x.is_finite() || x < 0.0 || (lo_open && x == 0.0) {
        return Err(bad(
            spec,
            format!("{key} must be a non-negative number, not `{v}`"),
        ));
    }
    Ok(x)
}

/// Splits `a,b=c,key=REGEX,WITH,COMMAS` into the leading value and `key=value` pairs: a part
/// that does not start with `name=` continues the previous identifiers regex.
type Options = (Option<String>, Vec<(String, String)>);

fn split_options(spec: &str, rest: &str) -> Result<Options> {
    let mut first = None;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (i, part) in rest.split(',').enumerate() {
        let key = part
            .split_once('=')
            .map(|(k, _)| k)
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        match key {
            Some(k) => pairs.push((k.to_string(), part[k.len() + 1..].to_string())),
            None if i == 0 => first = Some(part.to_string()),
            None => match pairs.last_mut() {
                Some((k, v)) if k.ends_with("_identifiers") => {
                    v.push(',');
                    v.push_str(part);
                }
                _ => return Err(bad(spec, format!("`{part}` is not a key=value option"))),
            },
        }
    }
    Ok((first.filter(|f| !f.trim().is_empty()), pairs))
}

impl FromStr for CacheConfig {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let (first, pairs) = split_options(spec, rest)?;
        let unknown =
            |k: &str, keys: &str| bad(spec, format!("unknown option `{k}` (options: {keys})"));
        match kind.trim() {
            "first-block" | "fbc" => {
                let mut c = FirstBlockCacheConfig::default();
                if let Some(f) = first {
                    c.threshold = fraction(spec, "the threshold", &f, false)?;
                }
                for (k, v) in pairs {
                    match k.as_str() {
                        "threshold" => c.threshold = fraction(spec, "threshold", &v, false)?,
                        _ => return Err(unknown(&k, "threshold")),
                    }
                }
                Ok(CacheConfig::FirstBlock(c))
            }
            "mag" => {
                let mut c = MagCacheConfig::default();
                match first.as_deref().map(str::trim) {
                    Some("calibrate") => c.calibrate = true,
                    Some(f) => c.threshold = fraction(spec, "the threshold", f, false)?,
                    None => {}
                }
                for (k, v) in pairs {
                    match k.as_str() {
                        "threshold" => c.threshold = fraction(spec, "threshold", &v, false)?,
                        "max_skip_steps" => {
                            c.max_skip_steps = num(spec, &k, &v, "a whole number")?
                        }
                        "retention_ratio" => {
                            let r = fraction(spec, "retention_ratio", &v, false)?;
                            if r > 1.0 {
                                return Err(bad(spec, "retention_ratio is a share of the steps, from 0 to 1"));
                            }
                            c.retention_ratio = r;
                        }
                        "num_inference_steps" => {
                            let n: usize = num(spec, &k, &v, "a whole number")?;
                            if n == 0 {
                                return Err(bad(spec, "num_inference_steps must be at least 1"));
                            }
                            c.num_inference_steps = Some(n);
                        }
                        "calibrate" => {
                            c.calibrate = num(spec, &k, &v, "true or false")?;
                        }
                        _ => {
                            return Err(unknown(
                                &k,
                                "threshold, max_skip_steps, retention_ratio, num_inference_steps, calibrate",
                            ))
                        }
                    }
                }
                Ok(CacheConfig::Mag(c))
            }
            "taylorseer" => {
                let mut c = TaylorSeerCacheConfig::default();
                if let Some(f) = first {
                    c.cache_interval = num(spec, "the cache interval", &f, "a whole number")?;
                }
                for (k, v) in pairs {
                    match k.as_str() {
                        "cache_interval" => c.cache_interval = num(spec, &k, &v, "a whole number")?,
                        "max_order" => c.max_order = num(spec, &k, &v, "a whole number")?,
                        "disable_cache_before_step" => {
                            c.disable_cache_before_step = num(spec, &k, &v, "a whole number")?
                        }
                        "disable_cache_after_step" => {
                            c.disable_cache_after_step = Some(num(spec, &k, &v, "a whole number")?)
                        }
                        "cache_identifiers" => {
                            c.cache_identifiers.get_or_insert_with(Vec::new).push(v)
                        }
                        "skip_predict_identifiers" => c
                            .skip_predict_identifiers
                            .get_or_insert_with(Vec::new)
                            .push(v),
                        _ => {
                            return Err(unknown(
                                &k,
                                "cache_interval, max_order, disable_cache_before_step, \
                                 disable_cache_after_step, cache_identifiers, skip_predict_identifiers",
                            ))
                        }
                    }
                }
                if c.cache_interval == 0 {
                    return Err(bad(spec, "the cache interval must be at least 1"));
                }
                Ok(CacheConfig::TaylorSeer(c))
            }
            other => Err(bad(spec, format!("unknown cache `{other}`"))),
        }
    }
}

/// How many transformer forwards a cached generation ran and skipped (conditional and
/// unconditional passes counted separately).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub forwards: usize,
    pub skipped: usize,
}

impl CacheStats {
    /// `skipped N of M transformer forwards`.
    pub fn message(&self) -> String {
        format!(
            "skipped {} of {} transformer forwards",
            self.skipped, self.forwards
        )
    }
}

/// What a finished cached generation reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheReport {
    pub stats: CacheStats,
    /// `mag:calibrate`: the magnitude ratios of the "cond" context, one per step (the list the
    /// reference prints).
    pub mag_ratios: Option<Vec<f64>>,
}

enum Runtime {
    FirstBlock {
        threshold: f64,
        states: HashMap<String, first_block_cache::FbcState>,
    },
    Mag {
        cfg: MagCacheConfig,
        ratios: Vec<f32>,
        steps: usize,
        states: HashMap<String, mag_cache::MagState>,
        calibrated: HashMap<String, Vec<f64>>,
    },
    TaylorSeer {
        cfg: TaylorSeerCacheConfig,
        hooked: HashMap<(usize, Attn), taylorseer_cache::Mode>,
        states: HashMap<(String, usize, Attn), taylorseer_cache::TaylorState>,
        /// This forward: hooked calls, predicted calls.
        calls: (usize, usize),
    },
}

/// One generation's cache state (see the module docs).
pub struct StepCache {
    runtime: Runtime,
    context: String,
    stats: CacheStats,
    skipped_now: bool,
}

/// What [`StepCache::mag_begin`] decided.
pub(crate) enum MagDecision {
    /// Run the blocks, then hand the output to [`StepCache::mag_end`].
    Compute,
    /// The forward's block output: input + previous residual.
    Skip(Tensor),
}

impl StepCache {
    /// A fresh state for a transformer of `layers` blocks (`added_kv`: Wan2.1 I2V's image
    /// projections), for a run of `steps` forwards per context.
    pub fn new(config: &CacheConfig, layers: usize, added_kv: bool, steps: usize) -> Result<Self> {
        config.validate()?;
        let runtime = match config {
            CacheConfig::FirstBlock(c) => {
                if layers < 2 {
                    return Err(Error::InvalidRequest(
                        "first-block: the cache needs a transformer with at least 2 blocks".into(),
                    ));
                }
                Runtime::FirstBlock {
                    threshold: c.threshold,
                    states: HashMap::new(),
                }
            }
            CacheConfig::Mag(c) => {
                let steps = c.num_inference_steps.unwrap_or(steps).max(1);
                Runtime::Mag {
                    ratios: c.ratios_for(steps),
                    cfg: c.clone(),
                    steps,
                    states: HashMap::new(),
                    calibrated: HashMap::new(),
                }
            }
            CacheConfig::TaylorSeer(c) => Runtime::TaylorSeer {
                hooked: taylorseer_cache::resolve(c, layers, added_kv)?
                    .into_iter()
                    .collect(),
                cfg: c.clone(),
                states: HashMap::new(),
                calls: (0, 0),
            },
        };
        Ok(Self {
            runtime,
            context: "cond".into(),
            stats: CacheStats::default(),
            skipped_now: false,
        })
    }

    /// The reference's `cache_context(name)`: the state the next forwards use.
    pub fn set_context(&mut self, name: &str) {
        if self.context != name {
            self.context = name.to_string();
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Ends the generation: the counts and, after a calibration, the "cond" ratios.
    pub fn finish(self) -> CacheReport {
        let mag_ratios = match self.runtime {
            Runtime::Mag {
                cfg,
                mut calibrated,
                states,
                ..
            } if cfg.calibrate => calibrated.remove("cond").or_else(|| {
                states
                    .get("cond")
                    .map(|s| s.calibration_ratios.clone())
                    .filter(|r| !r.is_empty())
            }),
            _ => None,
        };
        CacheReport {
            stats: self.stats,
            mag_ratios,
        }
    }

    pub(crate) fn is_first_block(&self) -> bool {
        matches!(self.runtime, Runtime::FirstBlock { .. })
    }

    pub(crate) fn is_mag(&self) -> bool {
        matches!(self.runtime, Runtime::Mag { .. })
    }

    /// Called at the start of every transformer forward.
    pub(crate) fn begin_forward(&mut self) {
        self.stats.forwards += 1;
        self.skipped_now = false;
        if let Runtime::TaylorSeer { calls, .. } = &mut self.runtime {
            *calls = (0, 0);
        }
    }

    /// Called at the end of every transformer forward.
    pub(crate) fn end_forward(&mut self) {
        if let Runtime::TaylorSeer { calls, .. } = &self.runtime {
            // Skipped when every hooked module predicted.
            self.skipped_now = calls.0 > 0 && calls.0 == calls.1;
        }
        if self.skipped_now {
            self.stats.skipped += 1;
        }
    }

    /// First Block Cache after block 0 (`input` → `output`): `None` computes the other blocks
    /// (then [`Self::fbc_tail`]); `Some` is the forward's block output.
    pub(crate) fn fbc_head(&mut self, input: &Tensor, output: &Tensor) -> Result<Option<Tensor>> {
        let Runtime::FirstBlock { threshold, states } = &mut self.runtime else {
            return Ok(None);
        };
        let state = states.entry(self.context.clone()).or_default();
        let residual = (output - input)?;
        let compute = first_block_cache::should_compute(
            *threshold,
            &residual,
            state.head_block_residual.as_ref(),
        )?;
        if compute {
            state.head_block_output = Some(output.clone());
            state.head_block_residual = Some(residual);
            return Ok(None);
        }
        let tail = state.tail_block_residual.as_ref().ok_or_else(|| {
            Error::InvalidRequest("first-block: no tail residual to reuse".into())
        })?;
        self.skipped_now = true;
        Ok(Some((tail + output)?))
    }

    /// First Block Cache after the last block of a computed forward.
    pub(crate) fn fbc_tail(&mut self, output: &Tensor) -> Result<()> {
        if let Runtime::FirstBlock { states, .. } = &mut self.runtime {
            let state = states.entry(self.context.clone()).or_default();
            if let Some(head) = &state.head_block_output {
                state.tail_block_residual = Some((output - head)?);
            }
        }
        Ok(())
    }

    /// MagCache before block 0, given the blocks' input.
    pub(crate) fn mag_begin(&mut self, input: &Tensor) -> Result<MagDecision> {
        let Runtime::Mag {
            cfg,
            ratios,
            steps,
            states,
            calibrated,
        } = &mut self.runtime
        else {
            return Ok(MagDecision::Compute);
        };
        let state = states.entry(self.context.clone()).or_default();
        if mag_cache::should_compute(cfg, ratios, *steps, state) {
            return Ok(MagDecision::Compute);
        }
        let out = match &state.previous_residual {
            Some(r) if r.dims() == input.dims() => (input + r)?,
            _ => {
                return Err(Error::InvalidRequest(
                    "mag: the previous residual does not fit this forward".into(),
                ))
            }
        };
        if let Some(done) = mag_cache::advance_step(*steps, state) {
            if cfg.calibrate {
                calibrated.insert(self.context.clone(), done);
            }
        }
        self.skipped_now = true;
        Ok(MagDecision::Skip(out))
    }

    /// MagCache after the last block of a computed forward (`input`: the blocks' input).
    pub(crate) fn mag_end(&mut self, input: &Tensor, output: &Tensor) -> Result<()> {
        let Runtime::Mag {
            cfg,
            steps,
            states,
            calibrated,
            ..
        } = &mut self.runtime
        else {
            return Ok(());
        };
        let state = states.entry(self.context.clone()).or_default();
        let residual = (output - input)?;
        if cfg.calibrate {
            let r = mag_cache::calibration_ratio(&residual, state.previous_residual.as_ref())?;
            state.calibration_ratios.push(r);
        }
        state.previous_residual = Some(residual);
        if let Some(done) = mag_cache::advance_step(*steps, state) {
            if cfg.calibrate {
                calibrated.insert(self.context.clone(), done);
            }
        }
        Ok(())
    }

    /// TaylorSeer around an attention module: runs `compute` and updates the factors, or
    /// predicts.
    pub(crate) fn taylor_module(
        &mut self,
        block: usize,
        which: Attn,
        compute: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let Runtime::TaylorSeer {
            cfg,
            hooked,
            states,
            calls,
        } = &mut self.runtime
        else {
            return Ok(compute()?);
        };
        let Some(&mode) = hooked.get(&(block, which)) else {
            return Ok(compute()?);
        };
        let state = states
            .entry((self.context.clone(), block, which))
            .or_default();
        state.current_step += 1;
        calls.0 += 1;
        if taylorseer_cache::should_compute(cfg, state.current_step) {
            let out = compute()?;
            state.update(&out, cfg.max_order, mode)?;
            Ok(out)
        } else {
            calls.1 += 1;
            state.predict(mode)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_syntax() {
        let c: CacheConfig = "first-block:0.5".parse().unwrap();
        assert_eq!(
            c,
            CacheConfig::FirstBlock(FirstBlockCacheConfig { threshold: 0.5 })
        );
        let c: CacheConfig = "first-block".parse().unwrap();
        assert_eq!(c, CacheConfig::FirstBlock(FirstBlockCacheConfig::default()));
        let CacheConfig::Mag(m) = "mag:0.5,max_skip_steps=2,retention_ratio=0.1"
            .parse()
            .unwrap()
        else {
            panic!("not mag")
        };
        assert_eq!(
            (m.threshold, m.max_skip_steps, m.retention_ratio),
            (0.5, 2, 0.1)
        );
        assert!(!m.calibrate && m.mag_ratios.is_none());
        let CacheConfig::Mag(m) = "mag:calibrate".parse().unwrap() else {
            panic!("not mag")
        };
        assert!(m.calibrate);
        let c: CacheConfig = "taylorseer:3,max_order=2,disable_cache_before_step=2,cache_identifiers=^blocks\\.\\d{1,2}\\.attn[12]$"
            .parse()
            .unwrap();
        let CacheConfig::TaylorSeer(t) = c else {
            panic!("not taylorseer")
        };
        assert_eq!(
            (t.cache_interval, t.max_order, t.disable_cache_before_step),
            (3, 2, 2)
        );
        assert_eq!(
            t.cache_identifiers.as_deref(),
            Some(&[r"^blocks\.\d{1,2}\.attn[12]$".to_string()][..])
        );
        let CacheConfig::TaylorSeer(t) = "taylorseer".parse().unwrap() else {
            panic!("not taylorseer")
        };
        assert_eq!(t, TaylorSeerCacheConfig::default());
    }

    #[test]
    fn bad_settings_are_named_in_plain_words() {
        for (spec, says) in [
            ("teacache:0.1", "unknown cache `teacache`"),
            ("first-block:abc", "must be a number"),
            ("first-block:-1", "non-negative"),
            ("mag:0.1,max_skip=2", "unknown option `max_skip`"),
            ("mag:0.1,retention_ratio=2", "from 0 to 1"),
            ("mag:0.1,max_skip_steps=-1", "whole number"),
            ("taylorseer:0", "at least 1"),
            ("taylorseer:2,order=2", "unknown option `order`"),
            ("mag:0.1,oops", "not a key=value"),
        ] {
            let e = spec.parse::<CacheConfig>().unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(e.contains("first-block:THRESHOLD"), "{spec}: {e}");
        }
        // MagCache without ratios: says how to get them.
        let c: CacheConfig = "mag:0.1".parse().unwrap();
        let e = StepCache::new(&c, 2, false, 10).err().unwrap().to_string();
        assert!(e.contains("mag:calibrate"), "{e}");
        assert!(c
            .clone()
            .with_mag_ratios(vec![1.0])
            .unwrap()
            .validate()
            .is_ok());
        let fbc: CacheConfig = "first-block".parse().unwrap();
        assert!(fbc.with_mag_ratios(vec![1.0]).is_err());
        let cal: CacheConfig = "mag:calibrate".parse().unwrap();
        assert!(cal.with_mag_ratios(vec![1.0]).is_err());
    }

    #[test]
    fn contexts_keep_separate_states_and_counts_add_up() {
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        let c = "first-block:0.1".parse::<CacheConfig>().unwrap();
        let mut cache = StepCache::new(&c, 2, false, 2).unwrap();
        let x = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let y = Tensor::new(&[1.0f32, 1.0, 1.0, 1.0], &dev).unwrap();
        for ctx in ["cond", "uncond", "cond", "uncond"] {
            cache.set_context(ctx);
            cache.begin_forward();
            if cache.fbc_head(&x, &y).unwrap().is_none() {
                cache.fbc_tail(&(&y * 2.0).unwrap()).unwrap();
            }
            cache.end_forward();
        }
        // Each context computes its first forward and skips its second.
        assert_eq!(
            cache.stats(),
            CacheStats {
                forwards: 4,
                skipped: 2
            }
        );
        assert_eq!(
            cache.stats().message(),
            "skipped 2 of 4 transformer forwards"
        );
    }

    /// Measurement on the bundled kino-shapes model (its defaults, 20 guided steps: 40 forwards per
    /// video): forwards skipped, time and how far the video moves from the uncached one, for
    /// each cache at settings recommended for Wan. Prints a table; run with
    /// `cargo test --release -p kino-engine --lib hooks::tests::kino_shapes_measure -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement (about a minute on 2 cores), not a check"]
    fn kino_shapes_measure() {
        use crate::wan::pipeline::{GenerateRequest, PipelineOptions, WanPipeline};
        use candle_core::Device;
        let dir = crate::testing::fixtures_dir().join("../../models/kino-shapes");
        let open = |cache: Option<CacheConfig>| {
            let options = PipelineOptions {
                cache,
                low_memory: false,
                ..PipelineOptions::for_device(Device::Cpu)
            };
            WanPipeline::open(&dir, options).unwrap()
        };
        let prompts = [
            "a red circle moving right",
            "a blue square moving down",
            "a green triangle moving left",
            "a yellow circle moving up",
        ];
        let run = |p: &mut WanPipeline| {
            let t = std::time::Instant::now();
            let outs: Vec<_> = prompts
                .iter()
                .map(|prompt| {
                    let req = GenerateRequest {
                        prompt: prompt.to_string(),
                        seed: Some(0),
                        ..Default::default()
                    };
                    let o = p.generate(&req, &mut crate::progress::ignore).unwrap();
                    (o.frames, o.cache_stats)
                })
                .collect();
            (outs, t.elapsed().as_secs_f64() / prompts.len() as f64)
        };
        let frame_diff = |a: &[Vec<u8>], b: &[Vec<u8>]| -> f64 {
            let (mut d, mut n) = (0f64, 0usize);
            for (x, y) in a.iter().zip(b) {
                for (u, v) in x.iter().zip(y) {
                    d += (*u as f64 - *v as f64).abs();
                    n += 1;
                }
            }
            d / n as f64
        };
        let (base, base_s) = run(&mut open(None));
        println!("no cache: {base_s:.2} s/video, 40 forwards");
        let mut cal = open(Some("mag:calibrate".parse().unwrap()));
        run(&mut cal);
        let ratios: Vec<f32> = cal
            .mag_calibration()
            .unwrap()
            .iter()
            .map(|&r| r as f32)
            .collect();
        println!("mag ratios (kino-shapes, 20 steps, cond): {ratios:?}");
        let mut settings: Vec<(String, CacheConfig)> = Vec::new();
        for spec in ["first-block:0.05", "first-block:0.1", "first-block:0.2"] {
            settings.push((spec.into(), spec.parse().unwrap()));
        }
        for spec in ["mag:0.06", "mag:0.12", "mag:0.24,max_skip_steps=4"] {
            let c = spec
                .parse::<CacheConfig>()
                .unwrap()
                .with_mag_ratios(ratios.clone())
                .unwrap();
            settings.push((spec.into(), c));
        }
        for spec in [
            r"taylorseer:2,cache_identifiers=^blocks\.\d+\.attn[12]$",
            r"taylorseer:3,cache_identifiers=^blocks\.\d+\.attn[12]$",
            r"taylorseer:3,max_order=2,cache_identifiers=^blocks\.\d+\.attn[12]$",
        ] {
            settings.push((spec.into(), spec.parse().unwrap()));
        }
        for (name, cfg) in settings {
            let (outs, s) = run(&mut open(Some(cfg)));
            let stats = outs[0].1.unwrap();
            let skipped: usize = outs.iter().map(|o| o.1.unwrap().skipped).sum();
            let forwards: usize = outs.iter().map(|o| o.1.unwrap().forwards).sum();
            let diff: f64 = outs
                .iter()
                .zip(&base)
                .map(|(o, b)| frame_diff(&o.0, &b.0))
                .sum::<f64>()
                / prompts.len() as f64;
            println!(
                "{name:<70} skipped {skipped}/{forwards} ({:.2}x fewer forwards; first video {}), \
                 {s:.2} s/video ({:.2}x), mean |Δpixel| {diff:.2}/255",
                forwards as f64 / (forwards - skipped) as f64,
                stats.message(),
                base_s / s
            );
        }
    }

    /// On the pipeline-cache fixture (diffusers 0.42.1's tiny Wan): calibration, separate
    /// passes under batched guidance, state reset between generations, refused models.
    mod on_the_fixture {
        use super::*;
        use crate::parity::read_tensors;
        use crate::testing::{fixtures_dir, rel_error};
        use crate::wan::pipeline::{PipelineOptions, WanPipeline};
        use candle_core::Device;

        fn case() -> std::path::PathBuf {
            fixtures_dir().join("pipeline-cache")
        }

        fn pipeline(cache: CacheConfig, batched_cfg: bool) -> WanPipeline {
            let options = PipelineOptions {
                cache: Some(cache),
                batched_cfg,
                low_memory: false,
                ..PipelineOptions::for_device(Device::Cpu)
            };
            WanPipeline::open(&case().join("model"), options).unwrap()
        }

        fn denoise(p: &mut WanPipeline) -> Tensor {
            let x = read_tensors(&case().join("input.safetensors")).unwrap();
            p.denoise(
                &x["latents"],
                &x["prompt_embeds"],
                Some(&x["negative_prompt_embeds"]),
                10,
                5.0,
                &mut crate::progress::ignore,
            )
            .unwrap()
        }

        #[test]
        fn calibration_reproduces_the_reference_ratios() {
            let mut p = pipeline("mag:calibrate".parse().unwrap(), false);
            denoise(&mut p);
            assert_eq!(p.cache_stats().unwrap().skipped, 0);
            let got = p.mag_calibration().unwrap().to_vec();
            let want = read_mag_ratios(&case().join("mag_ratios.json")).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - *w as f64).abs() < 1e-5, "{got:?} vs {want:?}");
            }
            // Written and read back as a ratio file.
            let path = std::env::temp_dir().join(format!("kino-mag-{}.json", std::process::id()));
            write_mag_ratios(&path, &got).unwrap();
            assert_eq!(read_mag_ratios(&path).unwrap().len(), 10);
            std::fs::remove_file(&path).ok();
        }

        #[test]
        fn batched_guidance_runs_the_passes_apart_and_each_generation_starts_over() {
            let ratios = read_mag_ratios(&case().join("mag_ratios.json")).unwrap();
            let cfg = "mag:0.1"
                .parse::<CacheConfig>()
                .unwrap()
                .with_mag_ratios(ratios)
                .unwrap();
            let mut apart = pipeline(cfg.clone(), false);
            let a = denoise(&mut apart);
            let stats = apart.cache_stats().unwrap();
            let mut batched = pipeline(cfg, true);
            let b = denoise(&mut batched);
            assert_eq!(batched.cache_stats(), Some(stats));
            assert!(rel_error(&a, &b).unwrap() < 1e-6);
            // A second generation on the same pipeline: the same skips and result.
            let c = denoise(&mut apart);
            assert_eq!(apart.cache_stats(), Some(stats));
            assert!(rel_error(&a, &c).unwrap() < 1e-6);
            assert_eq!(stats.forwards, 20);
            assert!(stats.skipped > 0);
        }

        #[test]
        fn vace_diffusion_forcing_and_two_expert_models_are_refused() {
            for (dir, says) in [
                ("pipeline-vace/model", "VACE"),
                ("pipeline-df/model", "diffusion-forcing"),
                ("pipeline-a14b-t2v/model", "two-expert"),
            ] {
                let options = PipelineOptions {
                    cache: Some("first-block:0.1".parse().unwrap()),
                    ..PipelineOptions::for_device(Device::Cpu)
                };
                let e = WanPipeline::open(&fixtures_dir().join(dir), options)
                    .err()
                    .unwrap()
                    .to_string();
                assert!(
                    e.contains(says) && e.contains("without --cache"),
                    "{dir}: {e}"
                );
            }
        }
    }
}
