"""Numerics modes: named ways for one Grok model to compute, chosen at build or load (`numerics=`).

A mode is data (a frozen `Numerics`), read by the modules at call time; switching it never touches
a weight. "upstream" reproduces every cast of upstream's JAX forward on the CPU (the parity harness
and the golden tests use it). "fast" (the default for users: DEFAULT) uses grok_torch.kernels' int8
weight-only matmuls and blocked GEMMs, natively in bf16 where the hardware has bf16 units. Other modes
name what they change, and the README ("Fidelity, measured") states how far each one is from upstream,
measured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Numerics", "PRESETS", "DEFAULT", "resolve"]


@dataclass(frozen=True)
class Numerics:
    """How the forward computes. Each field is one decision, with upstream's choice as its default."""

    name: str
    summary: str
    # Fields below were added with the "fast" mode; each default is upstream's choice.
    # bf16 x bf16 matmuls: "fp32" sums the fp32 products and rounds once (XLA's CPU result, bit for bit);
    # "native" uses torch's bf16 GEMM where the hardware has bf16 dot units (CUDA, AVX512-BF16, AMX) and
    # the fp32 form on blocks of the weight elsewhere (grok_torch.kernels: faster there).
    bf16_matmul: str = "fp32"
    # int8 weights: "dequantize" materialises each matrix with upstream's rounding, then multiplies;
    # "kernel" uses grok_torch.kernels (torch's int8 weight-only matmul for few rows, blocked
    # dequantization into a reused buffer for many), never a whole float matrix per call.
    int8_matmul: str = "dequantize"
    # The expert hidden state gelu(gate) * up and the down projection: "fp32" as upstream's one-hot expert
    # selection promotes them; "activation" in the compute dtype; "auto" in the compute dtype where the bf16
    # matmul runs natively (then the down projection is a bf16 GEMM), else fp32 (no faster in bf16 there).
    expert_hidden_dtype: str = "fp32"


UPSTREAM = Numerics(
    name="upstream",
    summary="every cast as upstream's JAX forward (bit-exact to it on the CPU)",
)

FAST = Numerics(
    name="fast",
    summary="int8 weight-only kernels, blocked matmuls, native bf16 GEMMs where the hardware has them "
            "(README: Fidelity, measured)",
    bf16_matmul="native",
    int8_matmul="kernel",
    expert_hidden_dtype="auto",
)

PRESETS: dict[str, Numerics] = {n.name: n for n in (UPSTREAM, FAST)}

# What users get when they do not choose (load, from_state_dict, Grok, generate); the parity harness and
# the golden tests ask for "upstream" by name.
DEFAULT = "fast"


def resolve(numerics: str | Numerics | None, default: str = DEFAULT) -> Numerics:
    """A preset by name (None: `default`), or a Numerics as given; ValueError naming the choices."""
    if numerics is None:
        numerics = default
    if isinstance(numerics, Numerics):
        return numerics
    try:
        return PRESETS[numerics]
    except KeyError:
        raise ValueError(f"numerics must be one of {', '.join(PRESETS)}, got {numerics!r}") from None
