//! `WanVACETransformer3DModel`: the Wan transformer with VACE's control branch (Wan2.1 VACE).
//!
//! Mirrors diffusers `src/diffusers/models/transformers/transformer_wan_vace.py` (0.42.1):
//!
//! | diffusers | here |
//! |---|---|
//! | `patch_embedding`, `condition_embedder`, `blocks`, `norm_out`, `proj_out` | the [`WanTransformer3DModel`] inside |
//! | `vace_patch_embedding` (`Conv3d(vace_in_channels, D)`) | `vace_patch_embedding` |
//! | `WanVACETransformerBlock` (`proj_in` on block 0, the Wan block, `proj_out`) | [`WanVACETransformerBlock`] |
//! | `control_hidden_states_scale` (one value per VACE block) | `scale` of [`WanVACETransformer3DModel::forward`] |
//!
//! The control latents (`control_hidden_states`, `[B, vace_in_channels, F, H, W]`: the inactive
//! and reactive VAE latents and the 64-channel mask, see `WanPipeline`) are patch-embedded and
//! zero-padded to the latents' token count. VACE block 0 adds the patch-embedded latents
//! (`proj_in(c) + x`); each VACE block runs the Wan block on the control stream and emits
//! `proj_out(c)` as a hint. The hint of VACE block k, times its scale, is added to the hidden
//! states after the k-th main layer named in `vace_layers` (in ascending order, as the
//! reference's `if i in vace_layers: pop()` does).
//!
//! One difference, in memory only: the reference runs every VACE block before the first main
//! block and keeps all hints; VACE blocks read only the control stream and never the main one,
//! so Kino runs VACE block k right before its hint is needed and keeps one control state (the
//! same numbers, `len(vace_layers) − 1` fewer `[B, N, D]` tensors alive).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::wan::transformer::{
    lin, BlockHook, BlockInputs, Config, ForwardVariant, Lin, PatchEmbedding,
    WanTransformer3DModel, WanTransformerBlock,
};
use crate::{Error, Result};

/// The diffusers class name in `transformer/config.json`.
pub const CLASS_NAME: &str = "WanVACETransformer3DModel";

/// `WanVACETransformerBlock`: a Wan block on the control stream, with an input projection on
/// block 0 and an output projection that makes the hint.
#[derive(Debug, Clone)]
pub(crate) struct WanVACETransformerBlock {
    proj_in: Option<Lin>,
    block: WanTransformerBlock,
    proj_out: Lin,
}

impl WanVACETransformerBlock {
    fn new(
        cfg: &Config,
        apply_input_projection: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        Ok(Self {
            proj_in: if apply_input_projection {
                Some(lin(d, d, vb.pp("proj_in"))?)
            } else {
                None
            },
            block: WanTransformerBlock::new(cfg, vb.clone())?,
            proj_out: lin(d, d, vb.pp("proj_out"))?,
        })
    }

    /// Returns `(conditioning_states, control_hidden_states)`.
    fn forward(
        &self,
        hidden_states: &Tensor,
        control: &Tensor,
        shared: &BlockInputs,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let control = match &self.proj_in {
            Some(p) => (p.forward(control)? + hidden_states)?,
            None => control.clone(),
        };
        let control = self.block.forward(
            &control,
            shared.context,
            shared.timestep_proj,
            shared.rope,
            shared.causal_block,
        )?;
        Ok((self.proj_out.forward(&control)?, control))
    }
}

/// The Wan VACE transformer.
#[derive(Debug, Clone)]
pub struct WanVACETransformer3DModel {
    inner: WanTransformer3DModel,
    vace_patch_embedding: PatchEmbedding,
    vace_blocks: Vec<WanVACETransformerBlock>,
    /// `vace_layers` in ascending order: the main layer that takes VACE block k's hint.
    hint_layers: Vec<usize>,
}

impl WanVACETransformer3DModel {
    /// Loads a diffusers `transformer/` folder of class `WanVACETransformer3DModel`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_lora(dir, dtype, device, None)
    }

    /// [`Self::load`] with LoRA adapters (`crate::lora`).
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: Option<std::sync::Arc<crate::lora::LoraSet>>,
    ) -> Result<Self> {
        let (inner, (vace_patch_embedding, vace_blocks)) = WanTransformer3DModel::load_with(
            dir,
            &[CLASS_NAME],
            dtype,
            device,
            lora,
            |cfg, vb| {
                let (layers, channels) = match (&cfg.vace_layers, cfg.vace_in_channels) {
                    (Some(l), Some(c)) => (l.len(), c),
                    _ => candle_core::bail!(
                        "a WanVACETransformer3DModel config needs vace_layers and vace_in_channels"
                    ),
                };
                let embed =
                    PatchEmbedding::with_channels(cfg, channels, vb.pp("vace_patch_embedding"))?;
                let blocks = (0..layers)
                    .map(|i| {
                        WanVACETransformerBlock::new(cfg, i == 0, vb.pp(format!("vace_blocks.{i}")))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok((embed, blocks))
            },
        )?;
        let mut hint_layers = inner.config().vace_layers.clone().unwrap_or_default();
        hint_layers.sort_unstable();
        Ok(Self {
            inner,
            vace_patch_embedding,
            vace_blocks,
            hint_layers,
        })
    }

    pub fn config(&self) -> &Config {
        self.inner.config()
    }

    /// Number of VACE blocks (`len(vace_layers)`): the length of a per-layer scale.
    pub fn num_vace_layers(&self) -> usize {
        self.vace_blocks.len()
    }

    /// Channels of the control latents (`vace_in_channels`).
    pub fn vace_in_channels(&self) -> usize {
        self.config().vace_in_channels.unwrap_or(0)
    }

    /// The reference `forward(hidden_states, timestep, encoder_hidden_states,
    /// encoder_hidden_states_image, control_hidden_states, control_hidden_states_scale)`.
    ///
    /// - `control_hidden_states`: `[B, vace_in_channels, F_c, H, W]` with at most the latents'
    ///   tokens (fewer frames are zero-padded, as the reference does).
    /// - `scale`: one value per VACE block (`None`: all ones).
    ///
    /// Returns the f32 sample `[B, out_channels, F, H, W]`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
        control_hidden_states: &Tensor,
        scale: Option<&[f64]>,
    ) -> Result<Tensor> {
        let cfg = self.config();
        let scale = match scale {
            Some(s) if s.len() != self.vace_blocks.len() => {
                return Err(Error::InvalidRequest(format!(
                    "control_hidden_states_scale has {} values; this VACE model has {} VACE \
                     layers (one value each, or one float for all)",
                    s.len(),
                    self.vace_blocks.len()
                )))
            }
            Some(s) => s.to_vec(),
            None => vec![1.0; self.vace_blocks.len()],
        };
        let (b, _, f, h, w) = hidden_states.dims5().map_err(|_| {
            Error::InvalidRequest(format!(
                "hidden_states has shape {:?}; expected [batch, {}, frames, height, width]",
                hidden_states.dims(),
                cfg.in_channels
            ))
        })?;
        let vc = self.vace_in_channels();
        match *control_hidden_states.dims() {
            [cb, c, cf, ch, cw] if cb == b && c == vc && cf <= f && ch == h && cw == w => {}
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "control_hidden_states has shape {:?}; expected [{b}, {vc}, ≤{f}, {h}, {w}] \
                     (the VACE control latents of these latents)",
                    control_hidden_states.dims()
                )))
            }
        }
        let [pt, ph, pw] = cfg.patch_size;
        if !control_hidden_states.dim(2)?.is_multiple_of(pt) {
            return Err(Error::InvalidRequest(format!(
                "control_hidden_states has {} frames, not a multiple of the patch size {pt}",
                control_hidden_states.dim(2)?
            )));
        }
        let n = (f / pt) * (h / ph) * (w / pw);
        let dtype = self.inner.dtype();
        let control = control_hidden_states
            .to_device(self.inner.device())?
            .to_dtype(dtype)?;
        let control = self
            .vace_patch_embedding
            .forward(&control, cfg.patch_size)?;
        let nc = control.dim(1)?;
        let control = if nc < n {
            let pad = Tensor::zeros((b, n - nc, control.dim(2)?), dtype, control.device())?;
            Tensor::cat(&[&control, &pad], 1)?
        } else {
            control
        };
        let mut branch = ControlBranch {
            blocks: &self.vace_blocks,
            hint_layers: &self.hint_layers,
            scale: &scale,
            control: Some(control),
            pending: None,
            next: 0,
        };
        self.inner.forward_variant(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            ForwardVariant::default(),
            Some(&mut branch),
        )
    }
}

/// The control stream of one forward (see the module docs for the lazy order).
struct ControlBranch<'a> {
    blocks: &'a [WanVACETransformerBlock],
    hint_layers: &'a [usize],
    scale: &'a [f64],
    /// Before `begin`: the patch-embedded control latents; after: the control state before
    /// VACE block `next`.
    control: Option<Tensor>,
    /// VACE block 0's hint, made in `begin`.
    pending: Option<Tensor>,
    next: usize,
}

impl BlockHook for ControlBranch<'_> {
    fn begin(&mut self, x: &Tensor, shared: &BlockInputs) -> Result<()> {
        // Block 0 reads the patch-embedded latents (`proj_in(c) + x`): run it now, while x is
        // still the embedding.
        let control = self.control.take().ok_or_else(|| {
            Error::InvalidRequest("the VACE control branch was started twice".into())
        })?;
        let (hint, control) = self.blocks[0].forward(x, &control, shared)?;
        self.control = Some(control);
        self.pending = Some(hint);
        Ok(())
    }

    fn after_block(&mut self, i: usize, x: Tensor, shared: &BlockInputs) -> Result<Tensor> {
        if self.hint_layers.get(self.next) != Some(&i) {
            return Ok(x);
        }
        let k = self.next;
        let hint = if k == 0 {
            self.pending.take()
        } else {
            let control = self.control.take().ok_or_else(|| {
                Error::InvalidRequest("the VACE control branch lost its state".into())
            })?;
            let (hint, control) = self.blocks[k].forward(&x, &control, shared)?;
            self.control = Some(control);
            Some(hint)
        }
        .ok_or_else(|| Error::InvalidRequest("the VACE control branch has no hint".into()))?;
        self.next += 1;
        let scaled = (hint * self.scale[k])?;
        Ok((x + scaled)?)
    }
}
