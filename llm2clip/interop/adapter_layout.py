"""Find the paper's text adapter in a foreign state dict by its structure, not by its key names.

The adapter is: N residual blocks, each a LayerNorm(D), a Linear(D -> H) and a Linear(H -> D), all with
biases; then a LayerNorm(D); then a Linear(D -> P) with bias. Its modules are grouped into units by
the key prefix up to the first integer (`0.fn.0` and `0.ln` are unit `0`; `blocks.2.fc1` is unit
`blocks.2`; `norm` is unit `norm`). A unit of one LayerNorm and two Linears is a block (blocks keep
their integer order), a lone LayerNorm is the final norm, a lone Linear is the projection. Anything
else, or shapes that disagree, is refused with the keys that did not match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

from llm2clip.errors import InputError


@dataclass(frozen=True)
class AdapterShape:
    embed_dim: int  # D, the LLM embedding
    hidden_dim: int  # H, inside each block
    depth: int  # N blocks
    projection_dim: int  # P


@dataclass
class _Module:
    name: str
    weight: Tensor | None = None
    bias: Tensor | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def is_norm(self) -> bool:
        return self.weight.ndim == 1 and self.bias is not None and self.bias.shape == self.weight.shape

    @property
    def is_linear(self) -> bool:
        return self.weight.ndim == 2 and self.bias is not None and tuple(self.bias.shape) == (self.weight.shape[0],)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _unit(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def match_paper_adapter(tensors: dict[str, Tensor], where: str) -> tuple[dict[str, Tensor], AdapterShape]:
    """`tensors`: the adapter's tensors, prefix removed. Returns them under LLM2CLIPModel's names, and the sizes."""
    modules: dict[str, _Module] = {}
    unmatched: list[str] = []
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias"):
            unmatched.append(key)
            continue
        module = modules.setdefault(name, _Module(name))
        setattr(module, kind, tensor)
        module.keys.append(key)
    units: dict[str, list[_Module]] = {}
    for name in sorted(modules, key=_natural):
        module = modules[name]
        if module.weight is None or not (module.is_norm or module.is_linear):
            unmatched += module.keys
        else:
            units.setdefault(_unit(name), []).append(module)

    blocks, norms, projections = [], [], []
    for unit_name in sorted(units, key=_natural):
        members = units[unit_name]
        norm = [m for m in members if m.is_norm]
        linear = [m for m in members if m.is_linear]
        if len(members) == 3 and len(norm) == 1 and len(linear) == 2:
            dim = norm[0].weight.shape[0]
            # fc1 reads D; with H == D the name order decides (fn.0 before fn.3)
            fc1, fc2 = sorted(linear, key=lambda m: (m.weight.shape[1] != dim, _natural(m.name)))
            if fc1.weight.shape[1] == dim and tuple(fc2.weight.shape) == (dim, fc1.weight.shape[0]):
                blocks.append((norm[0], fc1, fc2))
                continue
        elif members == norm and len(norm) == 1:
            norms.append(norm[0])
            continue
        elif members == linear and len(linear) == 1:
            projections.append(linear[0])
            continue
        unmatched += [key for m in members for key in m.keys]

    if not unmatched and blocks and len(norms) == 1 and len(projections) == 1:
        dim, hidden = blocks[0][1].weight.shape[1], blocks[0][1].weight.shape[0]
        same = all(fc1.weight.shape == (hidden, dim) for _, fc1, _ in blocks)
        if same and norms[0].weight.shape == (dim,) and projections[0].weight.shape[1] == dim:
            return _renamed(blocks, norms[0], projections[0]), AdapterShape(
                embed_dim=dim, hidden_dim=hidden, depth=len(blocks), projection_dim=projections[0].weight.shape[0])
        unmatched = sorted(tensors)
    elif not unmatched:
        unmatched = sorted(tensors)
    raise InputError(
        f"{where}: the text adapter does not have the paper's structure (N blocks of LayerNorm(D), Linear(D->H), "
        f"Linear(H->D), then LayerNorm(D) and Linear(D->P), all with biases); keys not matched: "
        f"{', '.join(f'{key} {tuple(tensors[key].shape)}' for key in sorted(unmatched, key=_natural))}"
    )


def _renamed(blocks, norm: _Module, projection: _Module) -> dict[str, Tensor]:
    state = {}
    for i, modules in enumerate(blocks):
        for ours, module in zip(("norm", "fc1", "fc2"), modules):
            state[f"text_adapter.blocks.{i}.{ours}.weight"] = module.weight
            state[f"text_adapter.blocks.{i}.{ours}.bias"] = module.bias
    state["text_adapter.norm.weight"], state["text_adapter.norm.bias"] = norm.weight, norm.bias
    state["text_projection.weight"], state["text_projection.bias"] = projection.weight, projection.bias
    return state
