//! Mirrors diffusers' `UniPCMultistepScheduler`
//! (`diffusers/schedulers/scheduling_unipc_multistep.py`, diffusers 0.42.1) in the flow-matching
//! mode Wan uses: `prediction_type="flow_prediction"`, `use_flow_sigmas=True`, `predict_x0=True`.
//!
//! Method names follow the reference: [`UniPCMultistepScheduler::convert_model_output`],
//! `multistep_uni_p_bh_update` (the predictor UniP) and `multistep_uni_c_bh_update` (the
//! corrector UniC), driven by `step`. Supported: `solver_order` 1–3, `solver_type` "bh1"/"bh2"
//! ("midpoint", "heun", "logrho" become "bh2" as in the reference), `final_sigmas_type`
//! "zero"/"sigma_min", `lower_order_final`, `disable_corrector`. Everything else the reference
//! offers (epsilon/sample/v prediction on the VP beta schedule, Karras/exponential/beta sigmas,
//! dynamic shifting, thresholding, `solver_p`, `shift_terminal`) is refused by [`Self::new`].
//!
//! Precision, as in the reference: the schedule is computed in float64 (numpy), then `sigmas` are
//! cast to float32 and `timesteps` truncated to integers. The step coefficients (`lambda`, `h`,
//! `rks`, `B_h`, `rhos`) are 0-dim float32 tensors in the reference, so they are `f32` here, and
//! the tensor math runs in the sample's dtype.

use candle_core::Tensor;
use serde::Deserialize;

use super::{check_step, linspace, promote, unsupported};
use crate::{Error, Result};

const CLASS: &str = "UniPCMultistepScheduler";

/// `scheduler_config.json` fields, with the defaults of the reference `__init__`. Fields that only
/// matter for modes we refuse are read (so any diffusers config parses) and checked in
/// [`UniPCMultistepScheduler::new`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: String,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub disable_corrector: Vec<usize>,
    pub solver_p: Option<serde_json::Value>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub timestep_spacing: String,
    pub steps_offset: usize,
    pub final_sigmas_type: String,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub shift_terminal: Option<f64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            final_sigmas_type: "zero".into(),
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

/// `solver_type`: the B(h) of the UniPC paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    /// `B(h) = h`.
    Bh1,
    /// `B(h) = e^h - 1`.
    Bh2,
}

/// UniPC multistep sampler (predictor UniP + corrector UniC) for flow-matching models.
#[derive(Clone)]
pub struct UniPCMultistepScheduler {
    config: Config,
    solver_type: SolverType,
    /// Integer timesteps (the reference's int64 tensor), one per step.
    timesteps: Vec<f64>,
    /// The reference's float32 `sigmas` (N + 1 values), held exactly as f64.
    sigmas: Vec<f64>,
    /// The last `solver_order` converted model outputs (x0 predictions), oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The sample the last predictor started from, for the next corrector.
    last_sample: Option<Tensor>,
    /// Whether `last_sample` is the very tensor the caller passed to `step` (no corrector ran):
    /// in the reference it is then a view the caller may overwrite (see
    /// [`super::Scheduler::sample_overwritten`]).
    last_sample_is_input: bool,
    this_order: usize,
    step_index: usize,
}

impl UniPCMultistepScheduler {
    /// Builds the scheduler; refuses options we do not implement, naming what is supported.
    pub fn new(mut config: Config) -> Result<Self> {
        let no = |what: String, supported: &str| Err(unsupported(CLASS, what, supported));
        // The reference's __init__ checks.
        if config.trained_betas.is_none()
            && !["linear", "scaled_linear", "squaredcos_cap_v2"]
                .contains(&config.beta_schedule.as_str())
        {
            return no(
                format!("beta_schedule \"{}\"", config.beta_schedule),
                "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\"",
            );
        }
        if ["midpoint", "heun", "logrho"].contains(&config.solver_type.as_str()) {
            config.solver_type = "bh2".into(); // register_to_config(solver_type="bh2")
        }
        let solver_type = match config.solver_type.as_str() {
            "bh1" => SolverType::Bh1,
            "bh2" => SolverType::Bh2,
            other => return no(format!("solver_type \"{other}\""), "\"bh1\", \"bh2\""),
        };
        // What we implement: the flow-matching mode.
        if config.prediction_type != "flow_prediction" {
            return no(
                format!("prediction_type \"{}\"", config.prediction_type),
                "\"flow_prediction\" (with use_flow_sigmas true, as Wan's scheduler_config.json)",
            );
        }
        if !config.use_flow_sigmas {
            return no(
                "use_flow_sigmas false (the VP beta schedule)".into(),
                "use_flow_sigmas true",
            );
        }
        if !config.predict_x0 {
            return no(
                "predict_x0 false".into(),
                "predict_x0 true (the reference has no flow_prediction without it)",
            );
        }
        if !(1..=3).contains(&config.solver_order) {
            return no(format!("solver_order {}", config.solver_order), "1, 2, 3");
        }
        for (on, name) in [
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.use_dynamic_shifting, "use_dynamic_shifting"),
            (config.thresholding, "thresholding"),
        ] {
            if on {
                return no(format!("{name} true"), &format!("{name} false"));
            }
        }
        if config.solver_p.as_ref().is_some_and(|v| !v.is_null()) {
            return no("solver_p".into(), "solver_p null");
        }
        if config.shift_terminal.is_some_and(|s| s != 0.0) {
            return no("shift_terminal".into(), "shift_terminal null");
        }
        if !["linspace", "leading", "trailing"].contains(&config.timestep_spacing.as_str()) {
            return no(
                format!("timestep_spacing \"{}\"", config.timestep_spacing),
                "\"linspace\", \"leading\", \"trailing\"",
            );
        }
        match config.final_sigmas_type.as_str() {
            "zero" | "sigma_min" => {}
            other => {
                return no(
                    format!("final_sigmas_type \"{other}\""),
                    "\"zero\", \"sigma_min\"",
                )
            }
        }
        // Combinations on which the reference returns NaN or inf on the last step (the step to
        // sigma 0 has h = inf, to sigma_min h = 0): refuse them rather than make a broken video.
        if solver_type == SolverType::Bh1 && config.final_sigmas_type == "zero" {
            return no(
                "solver_type \"bh1\" with final_sigmas_type \"zero\" (diffusers returns NaN on the last step)".into(),
                "\"bh2\", or \"bh1\" with final_sigmas_type \"sigma_min\"",
            );
        }
        if !config.lower_order_final && config.solver_order > 1 {
            return no(
                format!(
                    "lower_order_final false with solver_order {} (diffusers returns inf or NaN on the last step)",
                    config.solver_order
                ),
                "lower_order_final true, or solver_order 1",
            );
        }
        if config.num_train_timesteps == 0 {
            return no("num_train_timesteps 0".into(), "a positive number");
        }
        Ok(Self {
            solver_type,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
            last_sample: None,
            last_sample_is_input: false,
            this_order: 0,
            step_index: 0,
            config,
        })
    }

    /// The config in force (with `flow_shift` as set by `set_shift`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `self.sigmas[i]`, the reference's float32 value.
    fn sigma(&self, i: usize) -> f32 {
        self.sigmas[i] as f32
    }

    /// `model_output_list[-(back + 1)]`.
    fn model_output(&self, back: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        n.checked_sub(back + 1)
            .and_then(|i| self.model_outputs[i].as_ref())
            .ok_or_else(|| {
                Error::InvalidRequest(format!("{CLASS}: no model output {back} steps back"))
            })
    }

    /// `convert_model_output`, flow prediction with `predict_x0`: `x0_pred = sample - sigma_t *
    /// model_output` (`sigma_t * model_output` in the model output's dtype, as the 0-dim float32
    /// sigma does not promote it).
    pub fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let sigma_t = self.sigma(self.step_index);
        let dtype = promote(sample.dtype(), model_output.dtype());
        let scaled = model_output.affine(sigma_t as f64, 0.0)?.to_dtype(dtype)?;
        Ok(sample.to_dtype(dtype)?.sub(&scaled)?)
    }

    /// `multistep_uni_p_bh_update`: the predictor UniP-`order`, from `sample` at
    /// `sigmas[step_index]` to `sigmas[step_index + 1]`.
    fn multistep_uni_p_bh_update(&self, sample: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = self.model_output(0)?;
        let x = sample;
        let i = self.step_index;
        let (alpha_t, sigma_t) = sigma_to_alpha_sigma_t(self.sigma(i + 1));
        let (alpha_s0, sigma_s0) = sigma_to_alpha_sigma_t(self.sigma(i));
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;

        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let si = i - k;
            let mi = self.model_output(k)?;
            let (alpha_si, sigma_si) = sigma_to_alpha_sigma_t(self.sigma(si));
            let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div_scalar(&mi.sub(m0)?, rk)?);
        }
        rks.push(1.0);
        let c = BhCoefficients::new(h, &rks, self.solver_type);

        let rhos_p = match order {
            1 => Vec::new(),
            // "for order 2, we use a simplified version"
            2 => vec![0.5],
            _ => solve(&c.r_without_last(), &c.b[..order - 1])?,
        };

        // x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        let x_t_ = x
            .affine((sigma_t / sigma_s0) as f64, 0.0)?
            .to_dtype(m0.dtype())?
            .sub(&m0.affine((alpha_t * c.h_phi_1) as f64, 0.0)?)?;
        // x_t = x_t_ - alpha_t * B_h * pred_res
        let x_t = match weighted_sum(&rhos_p, &d1s)? {
            Some(pred_res) => x_t_.sub(&pred_res.affine((alpha_t * c.b_h) as f64, 0.0)?)?,
            // pred_res = 0: the reference still subtracts `alpha_t * B_h * 0` (NaN if B_h is
            // infinite), which is `x_t_` itself otherwise.
            None => {
                let zero_term = alpha_t * c.b_h * 0.0;
                if zero_term == 0.0 {
                    x_t_
                } else {
                    x_t_.affine(1.0, -(zero_term as f64))?
                }
            }
        };
        Ok(x_t.to_dtype(x.dtype())?)
    }

    /// `multistep_uni_c_bh_update`: the corrector UniC-`order`, which refines `this_sample` (the
    /// last predictor's result, at `sigmas[step_index]`) using `this_model_output` there.
    fn multistep_uni_c_bh_update(
        &self,
        this_model_output: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let m0 = self.model_output(0)?;
        let x = last_sample;
        let model_t = this_model_output;
        let i = self.step_index;
        let (alpha_t, sigma_t) = sigma_to_alpha_sigma_t(self.sigma(i));
        let (alpha_s0, sigma_s0) = sigma_to_alpha_sigma_t(self.sigma(i - 1));
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;

        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let si = i - (k + 1);
            let mi = self.model_output(k)?;
            let (alpha_si, sigma_si) = sigma_to_alpha_sigma_t(self.sigma(si));
            let rk = (lambda(alpha_si, sigma_si) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div_scalar(&mi.sub(m0)?, rk)?);
        }
        rks.push(1.0);
        let c = BhCoefficients::new(h, &rks, self.solver_type);

        let rhos_c = match order {
            // "for order 1, we use a simplified version"
            1 => vec![0.5],
            _ => solve(&c.r, &c.b)?,
        };

        // x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        let x_t_ = x
            .affine((sigma_t / sigma_s0) as f64, 0.0)?
            .to_dtype(m0.dtype())?
            .sub(&m0.affine((alpha_t * c.h_phi_1) as f64, 0.0)?)?;
        // x_t = x_t_ - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        let rho_last = rhos_c[order - 1];
        let d1_t = model_t.sub(m0)?;
        let mut correction = d1_t.affine(rho_last as f64, 0.0)?;
        if let Some(corr_res) = weighted_sum(&rhos_c[..order - 1], &d1s)? {
            correction = corr_res.add(&correction)?;
        }
        let x_t = x_t_.sub(&correction.affine((alpha_t * c.b_h) as f64, 0.0)?)?;
        Ok(x_t.to_dtype(x.dtype())?)
    }
}

/// `_sigma_to_alpha_sigma_t` with `use_flow_sigmas`: `alpha_t = 1 - sigma`, `sigma_t = sigma`.
fn sigma_to_alpha_sigma_t(sigma: f32) -> (f32, f32) {
    (1.0 - sigma, sigma)
}

/// `lambda = log(alpha) - log(sigma)` (infinite at sigma 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `tensor / scalar`, a true division as the reference's `(mi - m0) / rk`.
fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// `torch.einsum("k,bkc...->bc...", rhos, D1s)`: `sum_k rhos[k] * D1s[k]`, or `None` (the
/// reference's `0`) when there are no terms.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (rho, d) in rhos.iter().zip(d1s) {
        let term = d.affine(*rho as f64, 0.0)?;
        acc = Some(match acc {
            Some(a) => a.add(&term)?,
            None => term,
        });
    }
    Ok(acc)
}

/// The B(h) quantities both updates build from `h` and `rks` (the reference computes them inline
/// in each update, in float32).
struct BhCoefficients {
    /// `expm1(hh)`, with `hh = -h` (`predict_x0`).
    h_phi_1: f32,
    /// `B_h`: `hh` (bh1) or `expm1(hh)` (bh2).
    b_h: f32,
    /// `R[i] = rks ** i`, `order` rows.
    r: Vec<Vec<f32>>,
    /// `b[i] = h_phi_k * factorial_i / B_h`.
    b: Vec<f32>,
}

impl BhCoefficients {
    fn new(h: f32, rks: &[f32], solver_type: SolverType) -> Self {
        let order = rks.len();
        let hh = -h; // predict_x0
        let h_phi_1 = hh.exp_m1(); // h\phi_1(h) = e^h - 1
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: u64 = 1;
        let b_h = match solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= i as u64 + 1;
            // `1 / factorial_i` is a Python float, cast to float32 against the 0-dim tensor.
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i as f64) as f32;
        }
        Self { h_phi_1, b_h, r, b }
    }

    /// `R[:-1, :-1]`.
    fn r_without_last(&self) -> Vec<Vec<f32>> {
        let n = self.r.len() - 1;
        self.r[..n].iter().map(|row| row[..n].to_vec()).collect()
    }
}

/// `torch.linalg.solve(a, b)` for the small systems UniPC builds: Gaussian elimination with
/// partial pivoting (LU, as LAPACK's `sgesv`) in float32.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let mut a: Vec<Vec<f32>> = a.to_vec();
    let mut x = b.to_vec();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[pivot][col] == 0.0 {
            return Err(Error::InvalidRequest(format!(
                "{CLASS}: the order-{n} UniPC system is singular (repeated sigmas in the schedule?)"
            )));
        }
        a.swap(col, pivot);
        x.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let l = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= l * p;
            }
            x[col + 1 + offset] -= l * x[col];
        }
    }
    for row in (0..n).rev() {
        let mut s = x[row];
        for k in row + 1..n {
            s -= a[row][k] * x[k];
        }
        x[row] = s / a[row][row];
    }
    Ok(x)
}

impl super::Scheduler for UniPCMultistepScheduler {
    /// Sets `flow_shift`, as `UniPCMultistepScheduler.from_config(config, flow_shift=shift)`.
    fn set_shift(&mut self, shift: f64) {
        self.config.flow_shift = shift;
    }

    fn shift(&self) -> f64 {
        self.config.flow_shift
    }

    /// `set_timesteps` with `use_flow_sigmas` (float64 numpy, as the reference).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::InvalidRequest(format!(
                "{CLASS}: the number of inference steps must be at least 1"
            )));
        }
        let shift = self.config.flow_shift;
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::InvalidRequest(format!(
                "{CLASS}: flow_shift must be a positive number, got {shift}"
            )));
        }
        let n_train = self.config.num_train_timesteps as f64;
        // sigmas = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)[:-1]
        let mut sigmas = linspace(1.0, 1.0 / n_train, num_inference_steps + 1);
        sigmas.pop();
        // sigmas = flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)
        for s in sigmas.iter_mut() {
            *s = shift * *s / (1.0 + (shift - 1.0) * *s);
        }
        // "to avoid inf torch.log(alpha_si) in multistep_uni_p_bh_update during first/second update"
        let eps = 1e-6;
        if (sigmas[0] - 1.0).abs() < eps {
            sigmas[0] -= eps;
        }
        // timesteps = sigmas * num_train_timesteps, then `.to(torch.int64)` (truncation).
        self.timesteps = sigmas.iter().map(|s| (s * n_train).trunc()).collect();
        let sigma_last = match self.config.final_sigmas_type.as_str() {
            "sigma_min" => sigmas[sigmas.len() - 1],
            _ => 0.0,
        };
        sigmas.push(sigma_last);
        // `.astype(np.float32)`
        self.sigmas = sigmas.iter().map(|&s| s as f32 as f64).collect();

        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.step_index = 0; // set_begin_index(0), as WanPipeline does
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// `step`: corrector on the new model output (from the second step), then the predictor.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let num_steps = self.timesteps.len();
        check_step(
            CLASS,
            step_index,
            self.step_index,
            num_steps,
            model_output,
            sample,
        )?;

        let use_corrector = step_index > 0
            && !self.config.disable_corrector.contains(&(step_index - 1))
            && self.last_sample.is_some();

        let model_output_convert = self.convert_model_output(model_output, sample)?;
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last_sample), true) => {
                self.multistep_uni_c_bh_update(&model_output_convert, last_sample, self.this_order)?
            }
            _ => sample.clone(),
        };

        self.model_outputs.remove(0);
        self.model_outputs.push(Some(model_output_convert));

        let solver_order = self.config.solver_order;
        let this_order = if self.config.lower_order_final {
            solver_order.min(num_steps - step_index)
        } else {
            solver_order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1); // warmup for multistep

        let prev_sample = self.multistep_uni_p_bh_update(&sample, self.this_order)?;
        self.last_sample = Some(sample);
        self.last_sample_is_input = !use_corrector;

        if self.lower_order_nums < solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev_sample)
    }

    fn boxed_clone(&self) -> Box<dyn super::Scheduler> {
        Box::new(self.clone())
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn sample_overwritten(&mut self, new_sample: &Tensor) {
        if self.last_sample_is_input {
            self.last_sample = Some(new_sample.clone());
        }
    }

    fn set_begin_index(&mut self, index: usize) -> Result<()> {
        super::check_begin(CLASS, index, self.timesteps.len())?;
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.step_index = index;
        Ok(())
    }

    /// `add_noise` with flow sigmas: `alpha_t = 1 − σ`, `sigma_t = σ` (σ cast to the sample's
    /// dtype), `alpha_t · original + sigma_t · noise`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = *self.sigmas.get(index).ok_or_else(|| {
            Error::InvalidRequest(format!("{CLASS}.add_noise: no sigma at index {index}"))
        })? as f32;
        let alpha_t = 1.0f32 - sigma;
        Ok(((original * alpha_t as f64)? + (noise * sigma as f64)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::Scheduler;
    use candle_core::{DType, Device};

    /// Wan2.1-T2V-1.3B-Diffusers `scheduler/scheduler_config.json`.
    const WAN21_CONFIG: &str = r#"{
      "_class_name": "UniPCMultistepScheduler",
      "_diffusers_version": "0.33.0.dev0",
      "beta_end": 0.02,
      "beta_schedule": "linear",
      "beta_start": 0.0001,
      "disable_corrector": [],
      "dynamic_thresholding_ratio": 0.995,
      "final_sigmas_type": "zero",
      "flow_shift": 3.0,
      "lower_order_final": true,
      "num_train_timesteps": 1000,
      "predict_x0": true,
      "prediction_type": "flow_prediction",
      "rescale_betas_zero_snr": false,
      "sample_max_value": 1.0,
      "solver_order": 2,
      "solver_p": null,
      "solver_type": "bh2",
      "steps_offset": 0,
      "thresholding": false,
      "timestep_spacing": "linspace",
      "trained_betas": null,
      "use_beta_sigmas": false,
      "use_exponential_sigmas": false,
      "use_flow_sigmas": true,
      "use_karras_sigmas": false,
      "some_future_field": 1
    }"#;

    fn wan_config() -> Config {
        serde_json::from_str(WAN21_CONFIG).expect("the Wan config parses")
    }

    #[test]
    fn parses_wan_config_and_defaults() {
        let cfg = wan_config();
        assert_eq!(cfg.flow_shift, 3.0);
        assert_eq!(cfg.prediction_type, "flow_prediction");
        assert!(cfg.use_flow_sigmas && cfg.predict_x0 && cfg.lower_order_final);
        assert_eq!(cfg.solver_order, 2);
        // Fields absent from the file take the reference defaults.
        assert!(!cfg.use_dynamic_shifting);
        assert_eq!(cfg.time_shift_type, "exponential");
        let defaults: Config = serde_json::from_str("{}").expect("empty config parses");
        assert_eq!(defaults, Config::default());
        assert_eq!(defaults.prediction_type, "epsilon");
        assert_eq!(defaults.flow_shift, 1.0);
        assert!(UniPCMultistepScheduler::new(cfg).is_ok());
    }

    #[test]
    fn wan_schedule_50_steps() -> Result<()> {
        let mut s = UniPCMultistepScheduler::new(wan_config())?;
        s.set_timesteps(50)?;
        assert_eq!(s.timesteps().len(), 50);
        assert_eq!(s.sigmas().len(), 51);
        assert_eq!(s.timesteps()[0], 999.0);
        assert_eq!(s.sigmas()[50], 0.0);
        assert_eq!(s.sigmas()[0], (1.0f64 - 1e-6) as f32 as f64);
        Ok(())
    }

    #[test]
    fn refuses_unsupported_options() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                serde_json::json!({"prediction_type": "epsilon"}),
                "flow_prediction",
            ),
            (
                serde_json::json!({"prediction_type": "v_prediction"}),
                "flow_prediction",
            ),
            (
                serde_json::json!({"use_flow_sigmas": false}),
                "use_flow_sigmas true",
            ),
            (serde_json::json!({"solver_order": 4}), "1, 2, 3"),
            (
                serde_json::json!({"solver_type": "dpmsolver++"}),
                "\"bh1\", \"bh2\"",
            ),
            (serde_json::json!({"solver_type": "bh1"}), "sigma_min"),
            (
                serde_json::json!({"use_karras_sigmas": true}),
                "use_karras_sigmas false",
            ),
            (
                serde_json::json!({"use_dynamic_shifting": true}),
                "use_dynamic_shifting false",
            ),
            (
                serde_json::json!({"thresholding": true}),
                "thresholding false",
            ),
            (
                serde_json::json!({"final_sigmas_type": "one"}),
                "\"zero\", \"sigma_min\"",
            ),
            (
                serde_json::json!({"lower_order_final": false}),
                "lower_order_final true",
            ),
            (
                serde_json::json!({"shift_terminal": 0.1}),
                "shift_terminal null",
            ),
            (
                serde_json::json!({"beta_schedule": "cosine"}),
                "scaled_linear",
            ),
        ];
        for (patch, expect) in cases {
            let mut raw: serde_json::Value = serde_json::from_str(WAN21_CONFIG).expect("parses");
            if let (Some(obj), Some(p)) = (raw.as_object_mut(), patch.as_object()) {
                for (k, v) in p {
                    obj.insert(k.clone(), v.clone());
                }
            }
            let cfg: Config = serde_json::from_value(raw).expect("patched config parses");
            let err = UniPCMultistepScheduler::new(cfg).err();
            let msg = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                matches!(err, Some(Error::InvalidRequest(_))) && msg.contains(expect),
                "{patch}: {msg}"
            );
        }
        // The reference maps these solver types to bh2.
        let mut cfg = wan_config();
        cfg.solver_type = "heun".into();
        let s = UniPCMultistepScheduler::new(cfg).expect("heun is bh2");
        assert_eq!(s.config().solver_type, "bh2");
    }

    #[test]
    fn step_errors() -> Result<()> {
        let dev = Device::Cpu;
        let mut s = UniPCMultistepScheduler::new(wan_config())?;
        let x = Tensor::zeros((1, 4, 2, 4, 4), DType::F32, &dev)?;
        assert!(matches!(s.step(&x, 0, &x), Err(Error::InvalidRequest(_))));
        assert!(matches!(s.set_timesteps(0), Err(Error::InvalidRequest(_))));
        s.set_timesteps(3)?;
        let bad = Tensor::zeros((1, 4, 2, 4, 2), DType::F32, &dev)?;
        let err = s
            .step(&bad, 0, &x)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("[1, 4, 2, 4, 2]"), "{err}");
        assert!(matches!(s.step(&x, 1, &x), Err(Error::InvalidRequest(_))));
        for i in 0..3 {
            s.step(&x, i, &x)?;
        }
        assert!(matches!(s.step(&x, 3, &x), Err(Error::InvalidRequest(_))));
        s.set_shift(-1.0);
        assert!(matches!(s.set_timesteps(3), Err(Error::InvalidRequest(_))));
        Ok(())
    }

    #[test]
    fn solve_matches_known_system() -> Result<()> {
        let a = vec![
            vec![0.0, 2.0, 1.0],
            vec![1.0, 1.0, 1.0],
            vec![4.0, 1.0, 2.0],
        ];
        let x = solve(&a, &[7.0, 6.0, 12.0])?;
        // [1, 2, 3]
        for (got, want) in x.iter().zip([1.0f32, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-5, "{x:?}");
        }
        assert!(solve(&[vec![1.0, 2.0], vec![2.0, 4.0]], &[1.0, 2.0]).is_err());
        Ok(())
    }
}
