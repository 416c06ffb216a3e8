//! Bias correction for quantized matrices: the empirical form of Nagel et al., "Data-Free
//! Quantization Through Weight Equalization and Bias Correction" (ICCV 2019, § 4.2).
//!
//! Rounding a matrix `W` to `Ŵ` (Q4_K, …) changes a layer's output by `(Ŵ − W)·x`. Its part
//! along the mean input `E[x]` is the same for every token: a bias error, which a transformer's
//! residual stream adds up block after block. Where the inputs are far from zero-mean (after a
//! GELU, after an attention that averages its values over many tokens) that part is much of the
//! error, and it is removed by storing `b − (Ŵ − W)·E[x]` as the layer's bias. The file keeps
//! its block types and names; any GGUF reader runs it as it is.
//!
//! [`record`] runs a closure (a few generations, or forwards) while every named linear layer of
//! the Wan transformers adds its input's column sums to a table on this thread; the result,
//! [`InputMeans`], goes to [`crate::gguf::quantize_component`].

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The mean input of every named linear layer seen while recording (diffusers prefix, e.g.
/// `blocks.3.ffn.net.2` → its `in_features` means).
#[derive(Debug, Clone, Default)]
pub struct InputMeans {
    pub means: HashMap<String, Vec<f64>>,
    /// Input rows (tokens) each mean was taken over.
    pub rows: HashMap<String, u64>,
}

impl InputMeans {
    /// The means of one transformer of the pipeline: `transformer` (also the only one of most
    /// models) or `transformer_2` (the low-noise expert of Wan2.2 A14B), whose layers have the
    /// same names; see [`set_component`].
    pub fn component(&self, folder: &str) -> InputMeans {
        let pick = |key: &String| -> Option<String> {
            match key.split_once(':') {
                Some((c, name)) if c == folder => Some(name.to_string()),
                Some(_) => None,
                None if folder == "transformer" => Some(key.clone()),
                None => None,
            }
        };
        let mut out = InputMeans::default();
        for (k, v) in &self.means {
            if let Some(name) = pick(k) {
                out.means.insert(name.clone(), v.clone());
                out.rows
                    .insert(name, self.rows.get(k).copied().unwrap_or(0));
            }
        }
        out
    }

    /// The mean input of the layer whose weight is `weight_name` (`….weight`), if recorded.
    pub fn for_weight(&self, weight_name: &str) -> Option<&[f64]> {
        let prefix = weight_name.strip_suffix(".weight")?;
        self.means.get(prefix).map(Vec::as_slice)
    }
}

type Sums = HashMap<String, (Vec<f64>, u64)>;

thread_local! {
    static SUMS: RefCell<Option<Sums>> = const { RefCell::new(None) };
    static COMPONENT: RefCell<Option<&'static str>> = const { RefCell::new(None) };
}

/// Which transformer the layers running next on this thread belong to, when it is not the
/// pipeline's `transformer`: a two-expert pipeline says `transformer_2` before each low-noise
/// step, so that the experts' layers (named alike) are recorded apart.
pub fn set_component(folder: &'static str) {
    if recording() {
        COMPONENT.with(|c| *c.borrow_mut() = (folder != "transformer").then_some(folder));
    }
}

/// Whether this thread is recording (the linear layers then take their unfused paths, so that
/// every layer's input is seen).
pub fn recording() -> bool {
    SUMS.with(|s| s.borrow().is_some())
}

/// Adds the column sums of `x` (`[…, in]`) to layer `name`'s table, when recording.
pub(crate) fn observe(name: &str, x: &Tensor) -> candle_core::Result<()> {
    if !recording() {
        return Ok(());
    }
    let k = x.dims().last().copied().unwrap_or(0);
    if k == 0 {
        return Ok(());
    }
    let rows = x.elem_count() / k;
    // Summed where the tensor is, in f32 (Metal has no f64); the table adds up in f64.
    let sums = x
        .to_dtype(DType::F32)?
        .reshape((rows, k))?
        .sum(0)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    let key = match COMPONENT.with(|c| *c.borrow()) {
        Some(c) => format!("{c}:{name}"),
        None => name.to_string(),
    };
    SUMS.with(|s| {
        if let Some(table) = s.borrow_mut().as_mut() {
            let e = table.entry(key).or_insert_with(|| (vec![0.0; k], 0));
            if e.0.len() == k {
                for (a, &b) in e.0.iter_mut().zip(&sums) {
                    *a += f64::from(b);
                }
                e.1 += rows as u64;
            }
        }
    });
    Ok(())
}

/// Runs `f` with this thread's linear layers recording their inputs, and returns its result with
/// their means. Nothing is recorded after `f` returns, whether it succeeded or not.
pub fn record<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, InputMeans)> {
    if recording() {
        return Err(Error::InvalidRequest(
            "a calibration is already being recorded on this thread".into(),
        ));
    }
    SUMS.with(|s| *s.borrow_mut() = Some(HashMap::new()));
    COMPONENT.with(|c| *c.borrow_mut() = None);
    let out = f();
    let table = SUMS.with(|s| s.borrow_mut().take()).unwrap_or_default();
    COMPONENT.with(|c| *c.borrow_mut() = None);
    let out = out?;
    if table.is_empty() {
        return Err(Error::InvalidRequest(
            "the calibration saw no linear layer run (was the model run on another thread?)".into(),
        ));
    }
    let mut m = InputMeans::default();
    for (name, (sums, rows)) in table {
        let n = rows.max(1) as f64;
        m.means
            .insert(name.clone(), sums.into_iter().map(|s| s / n).collect());
        m.rows.insert(name, rows);
    }
    Ok((out, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// A recorded mean is the column mean of every input seen, over all calls; nothing is kept
    /// after `record` returns, and a run that records nothing is an error.
    #[test]
    fn records_column_means_on_this_thread_only() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let b = Tensor::new(&[[[5f32, 0.0]]], &dev).unwrap();
        let ((), m) = record(|| {
            observe("l", &a)?;
            observe("l", &b)?;
            // Another thread's layers are not this recording's.
            std::thread::spawn(move || {
                observe("other", &Tensor::ones((1, 2), DType::F32, &Device::Cpu)?)
            })
            .join()
            .unwrap()?;
            Ok(())
        })
        .unwrap();
        assert_eq!(m.means["l"], vec![3.0, 2.0]);
        assert_eq!(m.rows["l"], 3);
        assert!(!m.means.contains_key("other"));
        assert_eq!(m.for_weight("l.weight"), Some(&[3.0, 2.0][..]));
        assert!(!recording());
        observe("l", &a).unwrap();
        assert!(record(|| Ok(())).is_err());
        assert!(record(|| record(|| Ok(()))).is_err());
        assert!(!recording());

        // Two experts' layers of the same name are kept apart.
        let ((), m) = record(|| {
            set_component("transformer");
            observe("l", &a)?;
            set_component("transformer_2");
            observe("l", &b)?;
            set_component("transformer");
            observe("l", &a)?;
            Ok(())
        })
        .unwrap();
        let (one, two) = (m.component("transformer"), m.component("transformer_2"));
        assert_eq!(one.means["l"], vec![2.0, 3.0]);
        assert_eq!(one.rows["l"], 4);
        assert_eq!(two.means["l"], vec![5.0, 0.0]);
        assert_eq!(two.rows["l"], 1);
        assert_eq!(m.component("vae").means.len(), 0);
    }

    /// The corrected bias makes the quantized layer exact on the mean input: `Ŵ·μ + b' = W·μ + b`,
    /// where the plain bias leaves the rounding's error there.
    #[test]
    fn corrected_bias_cancels_the_error_at_the_mean_input() {
        let dev = Device::Cpu;
        let (rows, cols) = (8, 512);
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, rows, &dev).unwrap();
        let mu: Vec<f64> = (0..cols).map(|i| 0.3 + 0.2 * ((i % 7) as f64)).collect();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let fixed = crate::gguf::corrected_bias(&b, &w, &q, &mu).unwrap();
        let m = Tensor::from_vec(mu.iter().map(|&v| v as f32).collect(), (cols, 1), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let out = |w: &Tensor, b: &Tensor| {
            w.to_dtype(DType::F64)
                .unwrap()
                .matmul(&m)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .add(&b.to_dtype(DType::F64).unwrap())
                .unwrap()
        };
        let want = out(&w, &b);
        let wq = q.dequantize(&dev).unwrap();
        let err = |got: Tensor| {
            (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (plain, corrected) = (err(out(&wq, &b)), err(out(&wq, &fixed)));
        assert!(plain > 1e-2, "the rounding moves the output at μ ({plain})");
        assert!(corrected < 1e-5, "{corrected}");
    }
}
