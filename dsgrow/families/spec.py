"""Model sizes as dsgrow sees them, and the Hugging Face config each family builds from them.

A `ModelSpec` is the family-independent description a recipe gives (layers, hidden, heads, ...);
`to_hf_config` turns it into the family's own `transformers` config. Pure transformers, no torch
modules are built here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

FAMILIES = ("gpt2", "llama", "bert")
PARAMETRIZATIONS = ("sp", "mup")
MUP_CONFIG_KEY = "dsgrow_mup"
"""The HF config attribute a muP model's base sizes travel in (inside dsgrow; exports fold muP away)."""


class SpecError(ValueError):
    """A model spec that cannot describe a real model (one-line message naming the field)."""


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of one transformer; every family reads the same fields."""

    family: str = "gpt2"
    """gpt2 | llama | bert."""
    layers: int = 2
    """Number of transformer blocks."""
    hidden: int = 64
    """Residual-stream width (d_model)."""
    heads: int = 4
    """Attention (query) heads; hidden must be divisible by heads."""
    kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); llama only. None means = heads."""
    ffn: Optional[int] = None
    """MLP inner width. None: 4*hidden for gpt2/bert; for llama the usual 8/3*hidden rounded up to 32."""
    vocab_size: int = 0
    """Vocabulary size; 0 until the tokenizer fills it."""
    max_seq_len: int = 128
    """Positions the model supports (learned positions for gpt2/bert, RoPE range for llama)."""
    tie_embeddings: Optional[bool] = None
    """Tie the LM head to the token embedding. None: True for gpt2/bert, False for llama."""
    dropout: float = 0.0
    """Dropout everywhere dropout exists (0 keeps runs bitwise reproducible)."""
    norm_eps: Optional[float] = None
    """LayerNorm/RMSNorm epsilon. None: the family's default."""
    rope_theta: float = 10000.0
    """RoPE base (llama)."""
    init_std: float = 0.02
    """Std of the normal init of weight matrices and embeddings."""
    parametrization: str = "sp"
    """sp (standard, the default) | mup (maximal update parametrisation, see families/mup.py)."""
    base_hidden: Optional[int] = None
    """muP only: the width the hyperparameters were tuned at (width multiplier = hidden / base_hidden)."""
    base_head_dim: Optional[int] = None
    """muP only: the head_dim the attention scale is anchored at (scale sqrt(base_head_dim) / head_dim,
    muP's 1/d). None: this model's head_dim (growth moves heads whole, so head_dim never changes)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SpecError(f"model.family: unknown family {self.family!r} (choose from {', '.join(FAMILIES)})")
        for name in ("layers", "hidden", "heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise SpecError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden % self.heads:
            raise SpecError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        if self.kv_heads is not None:
            if self.family != "llama" and self.kv_heads != self.heads:
                raise SpecError(f"model.kv_heads: grouped-query attention is llama only ({self.family} has kv_heads = heads)")
            if self.kv_heads <= 0 or self.heads % self.kv_heads:
                raise SpecError(f"model.kv_heads ({self.kv_heads}) must divide model.heads ({self.heads})")
        if self.ffn is not None and self.ffn <= 0:
            raise SpecError(f"model.ffn must be a positive integer, got {self.ffn!r}")
        if self.vocab_size < 0:
            raise SpecError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise SpecError(f"model.parametrization: unknown {self.parametrization!r} (choose from sp, mup)")
        for name in ("base_hidden", "base_head_dim"):
            v = getattr(self, name)
            if v is None:
                continue
            if self.parametrization != "mup":
                raise SpecError(f"model.{name} is a muP setting; set model.parametrization: mup or drop it")
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"model.{name} must be a positive integer, got {v!r}")
        if self.parametrization == "mup" and self.base_hidden is None:
            raise SpecError("model.base_hidden is required with parametrization: mup (the width the "
                            "hyperparameters were tuned at, e.g. the first stage's hidden)")

    # Derived sizes --------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn is not None:
            return self.ffn
        if self.family == "llama":
            # LLaMA's SwiGLU keeps the MLP's parameter count near a 4x GELU MLP: 2/3 * 4h, rounded.
            return 32 * -(-(8 * self.hidden // 3) // 32)
        return 4 * self.hidden

    @property
    def tied(self) -> bool:
        return self.tie_embeddings if self.tie_embeddings is not None else self.family != "llama"

    @property
    def eps(self) -> float:
        if self.norm_eps is not None:
            return self.norm_eps
        return {"gpt2": 1e-5, "llama": 1e-6, "bert": 1e-12}[self.family]

    @property
    def causal(self) -> bool:
        """Next-token LM (gpt2, llama); BERT trains masked-LM."""
        return self.family != "bert"

    @property
    def learned_positions(self) -> bool:
        """A position embedding table (gpt2, bert); llama's RoPE has none."""
        return self.family != "llama"

    @property
    def mup(self) -> bool:
        return self.parametrization == "mup"

    @property
    def width_mult(self) -> float:
        """hidden / base_hidden under muP; 1.0 in the standard parametrisation."""
        return self.hidden / self.base_hidden if self.mup else 1.0

    @property
    def attn_scale(self) -> float:
        """The factor on q.k: 1/sqrt(head_dim) (SP); sqrt(base_head_dim)/head_dim (muP's 1/d, equal
        to SP's at the base head_dim)."""
        if not self.mup:
            return 1.0 / math.sqrt(self.head_dim)
        return math.sqrt(self.base_head_dim or self.head_dim) / self.head_dim

    def as_sp(self) -> "ModelSpec":
        """The same sizes in the standard parametrisation (what a folded muP model is)."""
        return replace(self, parametrization="sp", base_hidden=None, base_head_dim=None)

    def with_vocab(self, vocab_size: int) -> "ModelSpec":
        return replace(self, vocab_size=vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"model: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def n_params(self, include_embeddings: bool = False) -> int:
        """Parameter count of the transformer blocks (and embeddings/head if asked)."""
        h, f, kv = self.hidden, self.ffn_dim, self.n_kv_heads * self.head_dim
        if self.family == "llama":
            attn = h * h + 2 * h * kv + h * h
            mlp = 3 * h * f
            norms = 2 * h
        else:
            attn = (h * h + 2 * h * kv + h * h) + (3 * h + h)  # weights + biases
            mlp = 2 * h * f + f + h
            norms = 4 * h
        n = self.layers * (attn + mlp + norms)
        if self.family == "gpt2":
            n += 2 * h  # ln_f
        elif self.family == "llama":
            n += h  # final RMSNorm
        else:
            n += h * h + h + 2 * h  # MLM head transform (dense + LayerNorm)
        if include_embeddings:
            n += self.vocab_size * h
            if self.family != "llama":
                n += self.max_seq_len * h
            if self.family == "bert":
                n += 2 * h + 2 * h + self.vocab_size  # token types, embedding LayerNorm, MLM bias
            if not self.tied:
                n += self.vocab_size * h
        return n

    # Hugging Face ---------------------------------------------------------------------------
    def to_hf_config(self):
        """The `transformers` config of this spec's family (needs vocab_size set). A muP spec's
        base sizes ride along as the config attribute `dsgrow_mup` (see families/mup.py)."""
        cfg = self._sp_hf_config()
        if self.mup:
            setattr(cfg, MUP_CONFIG_KEY, {"base_hidden": self.base_hidden, "base_head_dim": self.base_head_dim})
        return cfg

    def _sp_hf_config(self):
        if self.vocab_size <= 0:
            raise SpecError("model.vocab_size is not set (it comes from the tokenizer)")
        import transformers as tf

        if self.family == "gpt2":
            return tf.GPT2Config(
                vocab_size=self.vocab_size, n_positions=self.max_seq_len, n_embd=self.hidden,
                n_layer=self.layers, n_head=self.heads, n_inner=self.ffn_dim,
                activation_function="gelu_new", resid_pdrop=self.dropout, embd_pdrop=self.dropout,
                attn_pdrop=self.dropout, layer_norm_epsilon=self.eps, initializer_range=self.init_std,
                tie_word_embeddings=self.tied, use_cache=False,
                bos_token_id=None, eos_token_id=None,
            )
        if self.family == "llama":
            return tf.LlamaConfig(
                vocab_size=self.vocab_size, hidden_size=self.hidden, intermediate_size=self.ffn_dim,
                num_hidden_layers=self.layers, num_attention_heads=self.heads,
                num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim,
                max_position_embeddings=self.max_seq_len, rms_norm_eps=self.eps,
                initializer_range=self.init_std, tie_word_embeddings=self.tied,
                attention_dropout=self.dropout, rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
                use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            )
        return tf.BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=self.ffn_dim,
            max_position_embeddings=self.max_seq_len, type_vocab_size=2, layer_norm_eps=self.eps,
            hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
            initializer_range=self.init_std, tie_word_embeddings=self.tied, pad_token_id=0,
        )

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelSpec":
        """Inverse of `to_hf_config` for the fields dsgrow models."""
        spec = cls._from_sp_hf_config(cfg)
        mup = getattr(cfg, MUP_CONFIG_KEY, None)
        if mup is None:
            return spec
        if not isinstance(mup, dict) or set(mup) - {"base_hidden", "base_head_dim"}:
            raise SpecError(f"config attribute {MUP_CONFIG_KEY}: expected {{base_hidden, base_head_dim}}, got {mup!r}")
        return replace(spec, parametrization="mup", base_hidden=mup.get("base_hidden"),
                       base_head_dim=mup.get("base_head_dim"))

    @classmethod
    def _from_sp_hf_config(cls, cfg) -> "ModelSpec":
        mt = cfg.model_type
        if mt == "gpt2":
            return cls(family="gpt2", layers=cfg.n_layer, hidden=cfg.n_embd, heads=cfg.n_head,
                       ffn=cfg.n_inner or 4 * cfg.n_embd, vocab_size=cfg.vocab_size,
                       max_seq_len=cfg.n_positions, tie_embeddings=bool(cfg.tie_word_embeddings),
                       dropout=float(cfg.resid_pdrop), norm_eps=cfg.layer_norm_epsilon,
                       init_std=cfg.initializer_range)
        if mt == "llama":
            rope_params = getattr(cfg, "rope_parameters", None) or {}
            rope = rope_params.get("rope_theta", 10000.0)
            # A spec rebuilds only plain RoPE with head_dim = hidden/heads; anything else would
            # load into a different model and give different logits, so refuse it here.
            if rope_params.get("rope_type", "default") != "default":
                raise SpecError(f"llama config: rope_type {rope_params['rope_type']!r} is not supported (only 'default')")
            head_dim = getattr(cfg, "head_dim", None)
            if head_dim is not None and head_dim * cfg.num_attention_heads != cfg.hidden_size:
                raise SpecError(f"llama config: head_dim {head_dim} * heads {cfg.num_attention_heads} "
                                f"!= hidden_size {cfg.hidden_size} (not supported)")
            return cls(family="llama", layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                       heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                       ffn=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                       max_seq_len=cfg.max_position_embeddings, tie_embeddings=bool(cfg.tie_word_embeddings),
                       dropout=float(cfg.attention_dropout), norm_eps=cfg.rms_norm_eps,
                       rope_theta=float(rope), init_std=cfg.initializer_range)
        if mt == "bert":
            return cls(family="bert", layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                       heads=cfg.num_attention_heads, ffn=cfg.intermediate_size,
                       vocab_size=cfg.vocab_size, max_seq_len=cfg.max_position_embeddings,
                       tie_embeddings=bool(cfg.tie_word_embeddings), dropout=float(cfg.hidden_dropout_prob),
                       norm_eps=cfg.layer_norm_eps, init_std=cfg.initializer_range)
        raise SpecError(f"unsupported Hugging Face model_type {mt!r} (dsgrow supports {', '.join(FAMILIES)})")
