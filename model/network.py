"""The digit-sequence reader: a Vision-Transformer encoder and an autoregressive decoder.

One file, read top to bottom: the vocabulary, the config, the building blocks
(patch embedding, attention, MLP, blocks), the encoder, the decoder with its
key/value cache, and the two models built from them (the sequence reader and the
single-digit classifier). Decoding strategies live in `model/decoding.py`.

Images are float tensors (B, 1, H, W) in [0, 1], white ink on black, at the
canonical scale that `model/preprocess.py` produces (digits `ModelConfig.digit_height` px tall).
Batches may mix sizes: images are zero-padded to a common size and a boolean
`pixel_mask` (B, H, W) says which pixels are real.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Vocabulary. The decoder predicts digits and EOS; BOS starts every sequence
# and PAD fills targets past EOS (ignored by the loss).
DIGITS = tuple(range(10))
EOS = 10
BOS = 11
PAD = 12
NUM_OUTPUTS = 11  # the output layer scores digits 0-9 and EOS only
NUM_TOKENS = 13  # the input embedding also knows BOS and PAD
VOCABULARY = {"digits": list(DIGITS), "eos": EOS, "bos": BOS, "pad": PAD}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved as JSON beside the weights."""

    kind: str = "reader"  # "reader" (encoder-decoder) or "classifier" (encoder + class head)
    stem_channels: tuple[int, ...] = (32, 64)  # stride-2 3x3 convs before patching; () = plain ViT
    patch_size: int = 2  # side of a patch, in pixels of the stem output
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 4
    n_decoder_layers: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    digit_height: float = 20.0  # pixels a digit is tall in the canonical input (model.preprocess rescales to it)
    max_image_height: int = 160  # largest canvas the reader accepts: four lines of digits
    max_image_width: int = 384  # a line of 16 widely spaced digits
    max_digits: int = 24  # longest sequence the decoder emits (EOS not counted)
    num_classes: int = 10  # classifier mode only

    def __post_init__(self) -> None:
        self.stem_channels = tuple(self.stem_channels)
        if self.kind not in ("reader", "classifier"):
            raise ValueError(f"ModelConfig.kind must be 'reader' or 'classifier', got {self.kind!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.d_model % 4:
            raise ValueError("d_model must be divisible by 4 for the 2D sine-cosine position code")

    @property
    def max_size(self) -> tuple[int, int]:
        """(height, width) of the largest canvas the reader accepts: what preprocessing fits images into."""
        return self.max_image_height, self.max_image_width

    @property
    def stride(self) -> int:
        """Pixels of input per token along each axis."""
        return self.patch_size * 2 ** len(self.stem_channels)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stem_channels"] = list(self.stem_channels)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; was this file written by a newer version?")
        return cls(**data)


# ---------------------------------------------------------------------------
# Building blocks


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions that turn pixels into local stroke features.

    A ViT on raw 7x7 patches must learn edge detectors through one linear map;
    a couple of small convolutions give it those for a few MFLOPs and make it
    far more sample-efficient on MNIST-sized data (Xiao et al. 2021, "Early
    convolutions help transformers see better").
    """

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.GELU()]
            in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchEmbedding(nn.Module):
    """Cut a feature map into non-overlapping p x p patches and project each to d_model.

    Written as unfold + linear, the way the original ViT describes it; a test
    checks that it equals the usual strided convolution.
    """

    def __init__(self, in_channels: int, patch_size: int, d_model: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # (B, C*p*p, L)
        return self.proj(patches.transpose(1, 2))  # (B, L, d)


def sincos_position_code(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2D sine-cosine position code (H*W, dim): half the channels encode the row, half the column.

    Fixed rather than learned so that every canvas size up to the maximum gets a
    sensible code, including sizes rarely seen in training.
    """
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs  # (H, q)
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs  # (W, q)
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_code, col_code], dim=2).reshape(height * width, dim)


class Attention(nn.Module):
    """Multi-head attention, self or cross, scaled by 1/sqrt(head_dim).

    Uses `scaled_dot_product_attention` unless the caller asks for the attention
    weights (the app's heatmaps), in which case the same maths runs explicitly.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project a source sequence to per-head keys and values, (B, h, S, hd) each."""
        key, value = self.key_value(source).chunk(2, dim=-1)
        return self.split_heads(key), self.split_heads(value)

    def attend(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from queries x (B, T, d) to given keys/values; mask is bool, True = may attend."""
        query = self.split_heads(self.query(x))
        weights = None
        if return_weights:
            scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)
            if is_causal:
                t_q, t_k = scores.shape[-2:]
                causal = torch.ones(t_q, t_k, dtype=torch.bool, device=x.device).tril(t_k - t_q)
                scores = scores.masked_fill(~causal, float("-inf"))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            attended = weights @ value
        else:
            # Under CPU autocast, attention alone stays in fp32: torch's bf16 attention kernel for the CPU is 2.7 times
            # slower than its fp32 one at these sizes, while the linear layers around it gain four times.
            fp32_attention = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            if fp32_attention:
                query, key, value = query.float(), key.float(), value.float()
            with torch.autocast("cpu", enabled=False) if fp32_attention else nullcontext():
                attended = F.scaled_dot_product_attention(
                    query,
                    key,
                    value,
                    attn_mask=mask,
                    is_causal=is_causal and mask is None,
                    dropout_p=self.dropout if self.training else 0.0,
                )
        batch, _, length, _ = attended.shape
        merged = attended.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.out(merged), weights


class MLP(nn.Module):
    def __init__(self, d_model: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(d_model * mlp_ratio)
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        key, value = self.attn.keys_values(h)
        x = x + self.attn.attend(h, key, value, mask=attn_mask)[0]
        return x + self.mlp(self.norm2(x))


@dataclass
class EncodedImages:
    """Encoder output: memory (B, N, d), token_mask (B, N) True = real, and the token grid shape."""

    memory: torch.Tensor
    token_mask: torch.Tensor
    grid: tuple[int, int]
    has_padding: bool = False

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """Mask in the (B, 1, 1, N) shape attention broadcasts; None when nothing is padded."""
        return self.token_mask[:, None, None, :] if self.has_padding else None


class Encoder(nn.Module):
    """Stem (optional) -> patch embedding -> 2D position code -> pre-norm blocks -> LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvStem(cfg.stem_channels) if cfg.stem_channels else None
        in_channels = self.stem.out_channels if self.stem else 1
        self.patch_embed = PatchEmbedding(in_channels, cfg.patch_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self._position_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def position_code(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # In a compiled graph the code costs little, while the cache dict adds a guard on its
            # length that recompiles the graph whenever the cache grows.
            return sincos_position_code(grid_h, grid_w, self.cfg.d_model, device)
        key = (grid_h, grid_w, str(device))
        if key not in self._position_cache:
            self._position_cache[key] = sincos_position_code(grid_h, grid_w, self.cfg.d_model, device)
        return self._position_cache[key]

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> EncodedImages:
        cfg = self.cfg
        _, _, height, width = images.shape
        if height > cfg.max_image_height or width > cfg.max_image_width:
            raise ValueError(
                f"image {height}x{width} exceeds the model's maximum {cfg.max_image_height}x{cfg.max_image_width}; "
                "run it through model.preprocess.preprocess_image first, which rescales it"
            )
        # Pad to a whole number of tokens; padded pixels are background and masked. Written without `%`:
        # torch.compile (PyTorch 2.14) fails on the modulo of a dynamic size when the batch shape changes.
        pad_h = (height + cfg.stride - 1) // cfg.stride * cfg.stride - height
        pad_w = (width + cfg.stride - 1) // cfg.stride * cfg.stride - width
        if pixel_mask is None and (pad_h or pad_w):
            pixel_mask = torch.ones(images.shape[0], height, width, dtype=torch.bool, device=images.device)
        if pixel_mask is not None and (pad_h or pad_w):
            images = F.pad(images, (0, pad_w, 0, pad_h))
            pixel_mask = F.pad(pixel_mask, (0, pad_w, 0, pad_h), value=False)
        features = self.stem(images) if self.stem else images
        x = self.patch_embed(features)
        grid = (images.shape[2] // cfg.stride, images.shape[3] // cfg.stride)
        x = x + self.position_code(*grid, images.device)
        if pixel_mask is None:
            token_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            # A token is real if any pixel under it is real.
            token_mask = F.max_pool2d(pixel_mask[:, None].float(), cfg.stride).flatten(1) > 0
        encoded = EncodedImages(x, token_mask, grid, has_padding=not bool(token_mask.all()))
        for block in self.blocks:
            x = block(x, encoded.attn_mask)
        encoded.memory = self.norm(x)
        return encoded


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the image, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cross_keys: torch.Tensor,
        cross_values: torch.Tensor,
        memory_mask: torch.Tensor | None,
        self_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        position: int = 0,
        return_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block; returns (x, cross-attention weights or None).

        Without self_cache, x is whole sequences and self-attention is causal. With
        self_cache (preallocated keys, values), x is the one new token at `position`:
        its key/value are written into the cache and it attends to the cached prefix.
        """
        h = self.norm1(x)
        key, value = self.self_attn.keys_values(h)
        if self_cache is None:
            x = x + self.self_attn.attend(h, key, value, is_causal=True)[0]
        else:
            keys, values = self_cache
            keys[:, :, position : position + 1] = key
            values[:, :, position : position + 1] = value
            x = x + self.self_attn.attend(h, keys[:, :, : position + 1], values[:, :, : position + 1])[0]
        attended, weights = self.cross_attn.attend(
            self.norm2(x), cross_keys, cross_values, mask=memory_mask, return_weights=return_weights
        )
        x = x + attended
        return x + self.mlp(self.norm3(x)), weights


@dataclass
class DecoderState:
    """Key/value cache for incremental decoding.

    Self-attention keys/values are preallocated for the longest sequence and
    filled one step at a time; cross-attention keys/values depend only on the
    image, so they are computed once.
    """

    self_keys: list[torch.Tensor]
    self_values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]
    cross_values: list[torch.Tensor]
    memory_mask: torch.Tensor | None
    length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows named by index (beam search reshuffles hypotheses)."""
        for tensors in (self.self_keys, self.self_values, self.cross_keys, self.cross_values):
            for i, t in enumerate(tensors):
                tensors[i] = t.index_select(0, index)
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)


class Decoder(nn.Module):
    """Token + position embeddings, decoder blocks, final norm and a head over digits and EOS."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(NUM_TOKENS, cfg.d_model)
        self.position_embed = nn.Embedding(cfg.max_digits + 1, cfg.d_model)  # BOS + one slot per digit
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, NUM_OUTPUTS)

    @property
    def layers(self) -> list[DecoderBlock]:
        """The blocks with their type: iterating an nn.ModuleList yields plain Modules to a type checker."""
        return cast(list[DecoderBlock], list(self.blocks))

    def forward(
        self, tokens: torch.Tensor, encoded: EncodedImages, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced pass over whole sequences: tokens (B, T) -> logits (B, T, NUM_OUTPUTS).

        With return_attention, also the cross-attention weights of every layer, (B, h, T, N) each.
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embed(tokens) + self.position_embed(positions)
        cross_weights = []
        for block in self.layers:
            cross_keys, cross_values = block.cross_attn.keys_values(encoded.memory)
            x, weights = block(x, cross_keys, cross_values, encoded.attn_mask, return_weights=return_attention)
            if return_attention:
                cross_weights.append(weights)
        return self.head(self.norm(x)), cross_weights

    def start(self, encoded: EncodedImages, max_steps: int) -> DecoderState:
        """Prepare a key/value cache for up to max_steps incremental steps."""
        batch = encoded.memory.shape[0]
        shape = (batch, self.cfg.n_heads, max_steps, self.cfg.d_model // self.cfg.n_heads)
        empty = lambda: encoded.memory.new_zeros(shape)
        cross = [block.cross_attn.keys_values(encoded.memory) for block in self.layers]
        return DecoderState(
            self_keys=[empty() for _ in self.blocks],
            self_values=[empty() for _ in self.blocks],
            cross_keys=[k for k, _ in cross],
            cross_values=[v for _, v in cross],
            memory_mask=encoded.attn_mask,
        )

    def step(
        self, token: torch.Tensor, state: DecoderState, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Feed one token per sequence (B,) at position state.length; returns logits (B, NUM_OUTPUTS).

        Only the new token is computed: earlier keys/values come from the cache,
        which is what makes greedy decoding O(T) rather than O(T^2) in work.
        """
        t = state.length
        position = torch.full_like(token, t)
        x = (self.token_embed(token) + self.position_embed(position))[:, None, :]  # (B, 1, d)
        cross_weights = []
        for i, block in enumerate(self.blocks):
            x, weights = block(
                x, state.cross_keys[i], state.cross_values[i], state.memory_mask,
                self_cache=(state.self_keys[i], state.self_values[i]), position=t, return_weights=return_attention,
            )
            if return_attention:
                cross_weights.append(weights[:, :, 0])  # (B, h, N)
        state.length = t + 1
        return self.head(self.norm(x))[:, 0], cross_weights


def init_weights(module: nn.Module) -> None:
    """timm-style initialisation: truncated normal(0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class DigitReader(nn.Module):
    """Image -> digit sequence: the encoder reads the canvas, the decoder writes digits then EOS."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind != "reader":
            raise ValueError("DigitReader needs ModelConfig(kind='reader')")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.apply(init_weights)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, NUM_OUTPUTS) for input tokens (BOS, d1, d2, ...)."""
        return self.decoder(tokens, self.encoder(images, pixel_mask))[0]


class DigitClassifier(nn.Module):
    """The same encoder with a class head on the mean of its tokens: the single-digit experiment."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind != "classifier":
            raise ValueError("DigitClassifier needs ModelConfig(kind='classifier')")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self.apply(init_weights)

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        encoded = self.encoder(images, pixel_mask)
        weights = encoded.token_mask.float()[..., None]
        pooled = (encoded.memory * weights).sum(1) / weights.sum(1)
        return self.head(pooled)


def build_model(cfg: ModelConfig) -> DigitReader | DigitClassifier:
    """The model a config describes."""
    return DigitReader(cfg) if cfg.kind == "reader" else DigitClassifier(cfg)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers (the conv stem's): the only layers whose output depends on the batch."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BOS",
    "EOS",
    "NUM_OUTPUTS",
    "PAD",
    "VOCABULARY",
    "DecoderState",
    "DigitClassifier",
    "DigitReader",
    "EncodedImages",
    "ModelConfig",
    "build_model",
    "count_parameters",
]
