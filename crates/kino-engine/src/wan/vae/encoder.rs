//! `WanEncoder3d` (diffusers `autoencoder_kl_wan.py`): causal conv in, down blocks (plain
//! `WanResidualBlock`/`WanResample` for Wan2.1, `WanResidualDownBlock` for Wan2.2), mid block,
//! RMS norm → SiLU → causal conv out to `2·z_dim` channels.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    ResampleMode, WanMidBlock, WanResample, WanResidualBlock, WanResidualDownBlock, WanRmsNorm,
};
use super::conv::{FeatCache, WanCausalConv3d};

/// One entry of the reference's `down_blocks` `ModuleList`.
#[derive(Debug, Clone)]
enum DownLayer {
    Res(WanResidualBlock),
    Resample(WanResample),
    ResidualDown(WanResidualDownBlock),
}

/// `WanEncoder3d`.
#[derive(Debug, Clone)]
pub struct WanEncoder3d {
    conv_in: WanCausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid_block: WanMidBlock,
    norm_out: WanRmsNorm,
    conv_out: WanCausalConv3d,
}

impl WanEncoder3d {
    /// `WanEncoder3d(in_channels, dim, z_dim, dim_mult, num_res_blocks, attn_scales=[],
    /// temperal_downsample, is_residual)`; `z_dim` here is the output channel count (`2·z`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        dim: usize,
        z_dim: usize,
        dim_mult: &[usize],
        num_res_blocks: usize,
        temperal_downsample: &[bool],
        is_residual: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(dim_mult.iter().copied())
            .map(|u| dim * u)
            .collect();
        let conv_in = WanCausalConv3d::k3(in_channels, dims[0], vb.pp("conv_in"))?;
        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::new();
        let last = dim_mult.len() - 1;
        for i in 0..dim_mult.len() {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            if is_residual {
                let t_down = if i != last {
                    temperal_downsample[i]
                } else {
                    false
                };
                down_blocks.push(DownLayer::ResidualDown(WanResidualDownBlock::new(
                    in_dim,
                    out_dim,
                    num_res_blocks,
                    t_down,
                    i != last,
                    vb_down.pp(down_blocks.len()),
                )?));
            } else {
                for _ in 0..num_res_blocks {
                    down_blocks.push(DownLayer::Res(WanResidualBlock::new(
                        in_dim,
                        out_dim,
                        vb_down.pp(down_blocks.len()),
                    )?));
                    in_dim = out_dim;
                }
                if i != last {
                    let mode = if temperal_downsample[i] {
                        ResampleMode::Downsample3d
                    } else {
                        ResampleMode::Downsample2d
                    };
                    down_blocks.push(DownLayer::Resample(WanResample::new(
                        out_dim,
                        mode,
                        None,
                        vb_down.pp(down_blocks.len()),
                    )?));
                }
            }
        }
        let out_dim = dims[dims.len() - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: WanMidBlock::new(out_dim, vb.pp("mid_block"))?,
            norm_out: WanRmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: WanCausalConv3d::k3(out_dim, z_dim, vb.pp("conv_out"))?,
        })
    }

    /// One chunk `[T, H, W, C]` with the feature cache of the previous chunks.
    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = self.conv_in.forward_cached(x, cache)?;
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Res(r) => r.forward(&x, cache)?,
                DownLayer::Resample(r) => r.forward(&x, cache)?,
                DownLayer::ResidualDown(r) => r.forward(&x, cache)?,
            };
        }
        x = self.mid_block.forward(&x, cache)?;
        x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward_cached(&x, cache)
    }
}
