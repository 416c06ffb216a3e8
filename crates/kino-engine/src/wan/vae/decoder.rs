//! `WanDecoder3d` (diffusers `autoencoder_kl_wan.py`): causal conv in, mid block, up blocks
//! (`WanUpBlock` for Wan2.1, `WanResidualUpBlock` for Wan2.2), RMS norm → SiLU → causal conv out.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{ResampleMode, WanMidBlock, WanResidualUpBlock, WanRmsNorm, WanUpBlock};
use super::conv::{FeatCache, WanCausalConv3d};

#[derive(Debug, Clone)]
enum UpLayer {
    Up(WanUpBlock),
    ResidualUp(WanResidualUpBlock),
}

/// `WanDecoder3d`.
#[derive(Debug, Clone)]
pub struct WanDecoder3d {
    conv_in: WanCausalConv3d,
    mid_block: WanMidBlock,
    up_blocks: Vec<UpLayer>,
    norm_out: WanRmsNorm,
    conv_out: WanCausalConv3d,
}

impl WanDecoder3d {
    /// `WanDecoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales=[], temperal_upsample,
    /// out_channels, is_residual)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        z_dim: usize,
        dim_mult: &[usize],
        num_res_blocks: usize,
        temperal_upsample: &[bool],
        out_channels: usize,
        is_residual: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let last_mult = dim_mult[dim_mult.len() - 1];
        let dims: Vec<usize> = std::iter::once(last_mult)
            .chain(dim_mult.iter().rev().copied())
            .map(|u| dim * u)
            .collect();
        let conv_in = WanCausalConv3d::k3(z_dim, dims[0], vb.pp("conv_in"))?;
        let mid_block = WanMidBlock::new(dims[0], vb.pp("mid_block"))?;
        let vb_up = vb.pp("up_blocks");
        let mut up_blocks = Vec::new();
        for i in 0..dim_mult.len() {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            if i > 0 && !is_residual {
                in_dim /= 2;
            }
            let up_flag = i != dim_mult.len() - 1;
            let t_up = up_flag && temperal_upsample[i];
            if is_residual {
                up_blocks.push(UpLayer::ResidualUp(WanResidualUpBlock::new(
                    in_dim,
                    out_dim,
                    num_res_blocks,
                    t_up,
                    up_flag,
                    vb_up.pp(i),
                )?));
            } else {
                let mode = match (up_flag, t_up) {
                    (true, true) => Some(ResampleMode::Upsample3d),
                    (true, false) => Some(ResampleMode::Upsample2d),
                    _ => None,
                };
                up_blocks.push(UpLayer::Up(WanUpBlock::new(
                    in_dim,
                    out_dim,
                    num_res_blocks,
                    mode,
                    vb_up.pp(i),
                )?));
            }
        }
        let out_dim = dims[dims.len() - 1];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            norm_out: WanRmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: WanCausalConv3d::k3(out_dim, out_channels, vb.pp("conv_out"))?,
        })
    }

    /// One latent chunk `[T, H, W, Z]` (one frame in practice) with the feature cache.
    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Result<Tensor> {
        // `x` is reassigned (not shadowed) so each intermediate is freed once used.
        let mut x = self.conv_in.forward_cached(x, cache)?;
        x = self.mid_block.forward(&x, cache)?;
        for up in &self.up_blocks {
            x = match up {
                UpLayer::Up(u) => u.forward(&x, cache)?,
                UpLayer::ResidualUp(u) => u.forward(&x, cache, first_chunk)?,
            };
        }
        x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward_cached(&x, cache)
    }
}
