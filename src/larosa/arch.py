"""Architectures as data: the module names LaRoSA needs, per HF model class.

This registry is the only place that knows module names. Adding a pre-norm, RMSNorm, gated-MLP decoder
is one `ArchSpec(...)` entry plus a line in `tests/test_invariance.py`.

Site names used everywhere (METHOD.md sec. 1):
  attn_in  = h1, the attention block input (after the input norm), consumed by q/k/v
  attn_out = h2, the concatenated heads, consumed by o_proj
  mlp_in   = h3, the MLP block input (after the post-attention norm), consumed by gate/up
  mlp_out  = h4, act(gate) * up, consumed by down_proj
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import LarosaError

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out: str = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    act_fn: str = "mlp.act_fn"  # act(gate), CATS thresholds its output
    rotary: str = "model.rotary_emb"  # holds inv_freq and attention_scaling (read by the decode engine)
    qk_norm: tuple[str, str] | None = None  # per-head RMSNorm on q and k outputs (Qwen 3)
    # whether x -> x Q on the residual stream commutes with every block (RMSNorm before each block only)
    rotation_invariant: bool = True
    why_not_invariant: str = ""
    norm_eps_attrs: tuple[str, ...] = field(default=("variance_epsilon", "eps"))

    def consumers(self, site: str) -> tuple[str, ...]:
        return {"attn_in": self.attn_in, "attn_out": (self.attn_out,), "mlp_in": self.mlp_in,
                "mlp_out": (self.mlp_out,)}[site]

    def site_norm(self, site: str) -> str:
        return {"attn_in": self.attn_norm, "mlp_in": self.mlp_norm}[site]


LLAMA = ArchSpec("llama")

REGISTRY: dict[str, ArchSpec] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": ArchSpec("mistral"),
    "Qwen2ForCausalLM": ArchSpec("qwen2"),  # q/k/v biases are rotated with the weights' outputs
    "Qwen3ForCausalLM": ArchSpec(  # q/k norms act on projection outputs: unaffected by rotations
        "qwen3", qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
    "Gemma3ForCausalLM": ArchSpec(
        "gemma3", mlp_norm="pre_feedforward_layernorm", rotation_invariant=False,
        why_not_invariant="Gemma 3 normalises each block's output (post_attention_layernorm, "
        "post_feedforward_layernorm) before the residual add, so a rotated residual stream is not "
        "equivalent; use --form official",
    ),
    "Gemma3ForConditionalGeneration": ArchSpec(
        "gemma3", rotation_invariant=False, why_not_invariant="multimodal Gemma 3 is not supported"),
}


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise LarosaError(f"module {path!r} not found in {type(root).__name__}") from exc


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _llama_like(model: nn.Module) -> bool:
    try:
        layer = get_submodule(model, LLAMA.layers)[0]
        for path in (LLAMA.attn_norm, LLAMA.mlp_norm, *LLAMA.attn_in, LLAMA.attn_out, *LLAMA.mlp_in,
                     LLAMA.mlp_out):
            layer.get_submodule(path)
        model.get_submodule(LLAMA.embed)
        model.get_submodule(LLAMA.final_norm)
        return True
    except (AttributeError, LarosaError, IndexError, TypeError):
        return False


def spec_for(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a model; unknown classes with Llama's module layout get the Llama default."""
    cls = type(model).__name__
    if cls in REGISTRY:
        return REGISTRY[cls]
    if _llama_like(model):
        return ArchSpec(name=f"llama-default({cls})")
    known = ", ".join(sorted(REGISTRY))
    raise LarosaError(f"unsupported architecture {cls}: register an ArchSpec in larosa.arch (known: {known})")


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_submodule(model, spec.layers)


def layer_body(layer: nn.Module) -> nn.Module:
    """The decoder layer itself, under a residual-adapter wrapper if there is one."""
    return layer.inner if hasattr(layer, "adapter") and hasattr(layer, "inner") else layer


def norm_eps(norm: nn.Module, spec: ArchSpec) -> float:
    for attr in spec.norm_eps_attrs:
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise LarosaError(f"cannot find the epsilon of {type(norm).__name__}")


def require_invariant(spec: ArchSpec) -> None:
    if not spec.rotation_invariant:
        raise LarosaError(f"the fused form needs residual-rotation invariance: {spec.why_not_invariant}")


def projection_shapes(model: nn.Module, spec: ArchSpec) -> list[dict[str, tuple[int, int]]]:
    """Per layer, per site: (d_in, total d_out over the site's consumers)."""
    out = []
    for layer in decoder_layers(model, spec):
        layer = layer_body(layer)
        row = {}
        for site in SITES:
            lins = [layer.get_submodule(p) for p in spec.consumers(site)]
            lins = [getattr(lin, "inner", lin) for lin in lins]
            row[site] = (lins[0].in_features, sum(lin.out_features for lin in lins))
        out.append(row)
    return out
