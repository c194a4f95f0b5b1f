"""UNetConfig: diffusers' UNet2DConditionModel config.json fields, resolved per block as diffusers does.

`UNetConfig.down_block_specs()`, `mid_block_spec()` and `up_block_specs()` turn diffusers' broadcasting rules
(int or per-block values, reversed lists for up blocks, `attention_head_dim` meaning the number of heads, nested
`transformer_layers_per_block`) into one explicit `BlockSpec` per block; mosaicjax/models/unet.py builds the
modules from those.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gin
import jax.numpy as jnp

REMAT_POLICIES = ('none', 'full', 'dots')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'chunked')
DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2DCrossAttn', None)

ACTIVATION_NAMES = ('silu', 'swish', 'mish', 'gelu', 'relu')  # diffusers' get_activation


def _tuple(x):
    """Lists (config.json) -> tuples, recursively, so the frozen config stays hashable."""
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One down/mid/up block as diffusers builds it from the config (resolved per-block values)."""
    out_channels: int  # channels of every resnet output in the block
    num_layers: int  # resnets in the block (up blocks: layers_per_block + 1)
    cross_attention: bool  # a Transformer2D follows every resnet (CrossAttn*/mid blocks)
    num_heads: int  # attention heads of the block's transformers
    head_dim: int  # out_channels // num_heads (integer division, as diffusers)
    transformer_layers: tuple[int, ...]  # BasicTransformerBlocks per Transformer2D, one entry per resnet
    only_cross_attention: bool  # attn1 attends to the text instead of the image
    resample: bool  # ends with a Downsample2D (down blocks) / Upsample2D (up blocks)


@gin.configurable('UNetConfig')
@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters: diffusers unet/config.json fields (defaults = diffusers' defaults), then
    framework fields. Fields that accept "int or per-block tuple" follow diffusers' broadcasting."""
    # --- diffusers UNet2DConditionModel fields ---
    sample_size: Any = None  # default latent side (int or (h, w)); informational, the pipeline reads it
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # noise-prediction channels out
    center_input_sample: bool = False  # sample -> 2 * sample - 1 before conv_in
    flip_sin_to_cos: bool = True  # timestep sinusoid order: (cos, sin) when True, (sin, cos) when False
    freq_shift: int = 0  # sinusoid frequency shift (downscale_freq_shift)
    down_block_types: tuple[str, ...] = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                         'CrossAttnDownBlock2D', 'DownBlock2D')
    mid_block_type: str | None = 'UNetMidBlock2DCrossAttn'  # or None: no mid block
    up_block_types: tuple[str, ...] = ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                                       'CrossAttnUpBlock2D')
    only_cross_attention: Any = False  # bool or per-block tuple; never applies to the mid block
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution level
    layers_per_block: Any = 2  # resnets per down block (int or per-block tuple); up blocks get one more
    downsample_padding: int = 1  # Downsample2D conv padding (0: pad right/bottom by 1 first)
    mid_block_scale_factor: float = 1.0  # mid-block resnets divide their output by this
    act_fn: str = 'silu'  # activation of resnets, time embedding and conv_out ('silu'|'swish'|'mish'|'gelu'|'relu')
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm eps of resnets and conv_norm_out
    cross_attention_dim: Any = 1280  # width of encoder_hidden_states (int or per-block tuple of equal ints)
    transformer_layers_per_block: Any = 1  # int, per-block tuple, or per-block tuple of per-layer tuples
    reverse_transformer_layers_per_block: Any = None  # up-block counterpart of the nested form
    attention_head_dim: Any = 8  # diffusers' misnomer: the NUMBER of heads unless num_attention_heads is set
    num_attention_heads: Any = None  # heads per block (int or per-block tuple); overrides attention_head_dim
    dual_cross_attention: bool = False  # must be False (DualTransformer2DModel is not implemented)
    use_linear_projection: bool = False  # Transformer2D proj_in/proj_out: Dense (SD2/SDXL) or 1x1 conv (SD1)
    upcast_attention: bool = False  # attention in float32 (only changes float16 compute; see Attention)
    class_embed_type: str | None = None  # must be None
    addition_embed_type: str | None = None  # None or 'text_time' (SDXL micro-conditioning)
    addition_time_embed_dim: int | None = None  # sinusoid width per SDXL time id (256)
    projection_class_embeddings_input_dim: int | None = None  # add_embedding input: text_embeds + ids*dim
    resnet_time_scale_shift: str = 'default'  # 'default' (add temb) or 'scale_shift' (FiLM after norm2)
    time_embedding_type: str = 'positional'  # must be 'positional'
    time_embedding_dim: int | None = None  # time embedding width; None = 4 * block_out_channels[0]
    conv_in_kernel: int = 3  # conv_in kernel size (padding (k-1)//2)
    conv_out_kernel: int = 3  # conv_out kernel size (padding (k-1)//2)
    # --- framework fields ---
    dtype: str = 'float32'  # compute dtype ('bfloat16': bf16 convs/matmuls over float32 params)
    param_dtype: str = 'float32'  # parameter storage dtype
    remat: str = 'none'  # rematerialise every ResnetBlock2D / BasicTransformerBlock: 'none' | 'full' | 'dots'
    attention_impl: str = 'auto'  # 'auto' | 'xla' | 'cudnn' | 'chunked' (models/unet.py attention())

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        object.__setattr__(self, 'upcast_attention', bool(self.upcast_attention))  # SDXL's json says null
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f'down_block_types {self.down_block_types}, up_block_types {self.up_block_types} and '
                             f'block_out_channels {self.block_out_channels} must have the same length')
        for kind, types, allowed in (('down', self.down_block_types, DOWN_BLOCK_TYPES),
                                     ('up', self.up_block_types, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f'unsupported {kind} block types {bad}; supported: {allowed}')
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f'unsupported mid_block_type {self.mid_block_type!r}; supported: {MID_BLOCK_TYPES}')
        for name in ('only_cross_attention', 'layers_per_block', 'cross_attention_dim',
                     'transformer_layers_per_block', 'attention_head_dim', 'num_attention_heads'):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f'{name}={v} needs one entry per block ({n})')
        if len(set(self.cross_attention_dims)) != 1:
            raise ValueError(f'cross_attention_dim={self.cross_attention_dim}: one encoder_hidden_states feeds '
                             'every block, so the widths must be equal')
        for c, h in zip(self.block_out_channels, self.block_num_heads):
            if c % self.norm_num_groups:
                raise ValueError(f'block_out_channels {c} not divisible by norm_num_groups {self.norm_num_groups}')
            if h < 1 or c // h < 1:
                raise ValueError(f'{h} heads do not fit {c} channels')
        if self.dual_cross_attention:
            raise ValueError('dual_cross_attention=True is not supported')
        if self.class_embed_type is not None:
            raise ValueError(f'class_embed_type={self.class_embed_type!r} is not supported (only None)')
        if self.addition_embed_type not in (None, 'text_time'):
            raise ValueError(f'addition_embed_type={self.addition_embed_type!r}; supported: None, "text_time"')
        if self.addition_embed_type == 'text_time' and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise ValueError('addition_embed_type="text_time" needs addition_time_embed_dim and '
                             'projection_class_embeddings_input_dim')
        if self.time_embedding_type != 'positional':
            raise ValueError(f'time_embedding_type={self.time_embedding_type!r} is not supported')
        if self.resnet_time_scale_shift not in ('default', 'scale_shift'):
            raise ValueError(f'resnet_time_scale_shift={self.resnet_time_scale_shift!r}')
        if self.act_fn.lower() not in ACTIVATION_NAMES:
            raise ValueError(f'act_fn={self.act_fn!r}; supported: {ACTIVATION_NAMES}')
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f'remat={self.remat!r}; expected one of {REMAT_POLICIES}')
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f'attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}')
        for name in ('dtype', 'param_dtype'):
            jnp.dtype(getattr(self, name))  # raises on an unknown dtype name
        self.down_block_specs(), self.up_block_specs(), self.mid_block_spec()  # validate the nesting

    # --- per-block values, resolved exactly as UNet2DConditionModel.__init__ does ---

    def _per_block(self, v) -> tuple:
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @property
    def block_num_heads(self) -> tuple[int, ...]:
        """Heads per down block: num_attention_heads, else attention_head_dim (diffusers' naming quirk)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return self._per_block(heads)

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return self._per_block(self.cross_attention_dim)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @staticmethod
    def _per_layer(v, num_layers: int, what: str) -> tuple[int, ...]:
        layers = (v,) * num_layers if isinstance(v, int) else tuple(v)
        if len(layers) < num_layers:
            raise ValueError(f'{what}={v} has fewer entries than the block has layers ({num_layers})')
        return layers[:num_layers]

    def down_block_specs(self) -> tuple[BlockSpec, ...]:
        n = len(self.block_out_channels)
        layers = self._per_block(self.layers_per_block)
        tl = self._per_block(self.transformer_layers_per_block)
        only = self._per_block(self.only_cross_attention)
        specs = []
        for i, (kind, c, heads) in enumerate(zip(self.down_block_types, self.block_out_channels,
                                                 self.block_num_heads)):
            specs.append(BlockSpec(
                out_channels=c, num_layers=layers[i], cross_attention=kind == 'CrossAttnDownBlock2D',
                num_heads=heads, head_dim=c // heads,
                transformer_layers=self._per_layer(tl[i], layers[i], 'transformer_layers_per_block'),
                only_cross_attention=bool(only[i]), resample=i < n - 1))
        return tuple(specs)

    def mid_block_spec(self) -> BlockSpec | None:
        if self.mid_block_type is None:
            return None
        c, heads = self.block_out_channels[-1], self.block_num_heads[-1]
        tl = self._per_block(self.transformer_layers_per_block)[-1]
        # UNetMidBlock2DCrossAttn has one transformer and never takes only_cross_attention.
        return BlockSpec(out_channels=c, num_layers=1, cross_attention=True, num_heads=heads, head_dim=c // heads,
                         transformer_layers=self._per_layer(tl, 1, 'transformer_layers_per_block[-1]'),
                         only_cross_attention=False, resample=False)

    def up_block_specs(self) -> tuple[BlockSpec, ...]:
        n = len(self.block_out_channels)
        layers = tuple(reversed(self._per_block(self.layers_per_block)))
        tl = (self.reverse_transformer_layers_per_block
              if self.reverse_transformer_layers_per_block is not None
              else tuple(reversed(self._per_block(self.transformer_layers_per_block))))
        only = tuple(reversed(self._per_block(self.only_cross_attention)))
        heads = tuple(reversed(self.block_num_heads))
        channels = tuple(reversed(self.block_out_channels))
        specs = []
        for i, kind in enumerate(self.up_block_types):
            c, num = channels[i], layers[i] + 1
            specs.append(BlockSpec(
                out_channels=c, num_layers=num, cross_attention=kind == 'CrossAttnUpBlock2D',
                num_heads=heads[i], head_dim=c // heads[i],
                transformer_layers=self._per_layer(tl[i], num, 'reverse transformer_layers_per_block'),
                only_cross_attention=bool(only[i]), resample=i < n - 1))
        return tuple(specs)

    @classmethod
    def from_diffusers_dict(cls, d: Mapping[str, Any], **overrides) -> 'UNetConfig':
        """From a diffusers unet/config.json dict (see mosaicjax.checkpoints.diffusers_unet)."""
        from mosaicjax.checkpoints import diffusers_unet  # pylint: disable=import-outside-toplevel
        return diffusers_unet.unet_config_from_diffusers(d, **overrides)

    def to_diffusers_dict(self) -> dict:
        from mosaicjax.checkpoints import diffusers_unet  # pylint: disable=import-outside-toplevel
        return diffusers_unet.unet_config_to_diffusers(self)
