//! `SkyReelsV2Transformer3DModel`: mirrors diffusers
//! `models/transformers/transformer_skyreels_v2.py` (0.42.1).
//!
//! The architecture and weight names are those of `WanTransformer3DModel`, and Kino runs both
//! through the same code ([`crate::wan::transformer`]); what SkyReels-V2 changes is passed as a
//! variant of that forward:
//!
//! | reference | here |
//! |---|---|
//! | `SkyReelsV2Timesteps` (`get_1d_sincos_pos_embed_from_grid`, float64) | `sincos_f64` |
//! | `enable_diffusion_forcing`: `timestep` `[B, F']`, one per latent frame, expanded to its tokens | `per_frame` |
//! | `inject_sample_info`: `fps_embedding` + `fps_projection` added to `timestep_proj` | `fps_index` |
//! | `num_frame_per_block` > 1: block-causal self-attention mask | `causal_frames` (each block's queries attend to the keys of blocks up to it) |

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::wan::transformer::{Config, ForwardVariant, WanTransformer3DModel};
use crate::Result;

/// The diffusers class name in `transformer/config.json`.
pub const CLASS_NAME: &str = "SkyReelsV2Transformer3DModel";

/// A SkyReels-V2 transformer.
#[derive(Debug, Clone)]
pub struct SkyReelsV2Transformer3DModel {
    inner: WanTransformer3DModel,
    /// `num_frame_per_block`, as `_set_ar_attention(causal_block_size)` may change it.
    num_frame_per_block: usize,
}

impl SkyReelsV2Transformer3DModel {
    /// Loads a diffusers `transformer/` folder of class `SkyReelsV2Transformer3DModel`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let inner = WanTransformer3DModel::load_class(dir, &[CLASS_NAME], dtype, device)?;
        let num_frame_per_block = inner.config().num_frame_per_block;
        Ok(Self {
            inner,
            num_frame_per_block,
        })
    }

    pub fn config(&self) -> &Config {
        self.inner.config()
    }

    /// `_set_ar_attention(causal_block_size)`: frames per causal attention block from now on.
    pub fn set_ar_attention(&mut self, causal_block_size: usize) {
        self.num_frame_per_block = causal_block_size.max(1);
    }

    /// The frames per causal attention block in force.
    pub fn num_frame_per_block(&self) -> usize {
        self.num_frame_per_block
    }

    /// The reference `forward(hidden_states, timestep, encoder_hidden_states,
    /// encoder_hidden_states_image, enable_diffusion_forcing, fps)`: `timestep` is `[B]`, or
    /// `[B, F']` with `enable_diffusion_forcing`; `fps` the index into `fps_embedding` (the
    /// pipeline passes 0 for 16 fps and 1 otherwise), needed with `inject_sample_info`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
        enable_diffusion_forcing: bool,
        fps: Option<usize>,
    ) -> Result<Tensor> {
        let fps_index = if self.config().inject_sample_info {
            fps
        } else {
            None
        };
        self.inner.forward_variant(
            hidden_states,
            timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            ForwardVariant {
                sincos_f64: true,
                per_frame: enable_diffusion_forcing,
                fps_index,
                causal_frames: (self.num_frame_per_block > 1).then_some(self.num_frame_per_block),
            },
            None,
        )
    }
}
