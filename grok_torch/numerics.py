"""Numerics modes: named ways for one Grok model to compute, chosen at build or load (`numerics=`).

A mode is data (a frozen `Numerics`), read by the modules at call time; switching it never touches
a weight. "upstream" reproduces every cast of upstream's JAX forward on the CPU (the parity harness
and the golden tests use it). Other modes name what they change, and the README states how far
each one is from upstream, measured.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Numerics", "PRESETS", "DEFAULT", "resolve"]


@dataclass(frozen=True)
class Numerics:
    """How the forward computes. Each field is one decision, with upstream's choice as its default."""

    name: str
    summary: str
    # Fields below were added for the "fast" mode; each default is upstream's choice.
    # bf16 matmuls on the CPU: False computes them in fp32 and rounds once (XLA's CPU result, bit for bit);
    # True uses torch's native bf16 GEMM (fp32 accumulation in another order, no fp32 operand copies).
    native_bf16_gemm: bool = False
    # int8 weights: "dequantize" materialises each matrix with upstream's rounding, then multiplies;
    # "kernel" uses grok_torch.kernels (torch's int8 weight-only matmul for few rows, blocked
    # dequantization into a reused buffer for many), never a whole float matrix per call.
    int8_matmul: str = "dequantize"
    # dtype of the expert hidden state (gelu(gate) * up) and of the down projection: "fp32" as upstream's
    # one-hot expert selection promotes it, or "activation" (the compute dtype).
    expert_hidden_dtype: str = "fp32"


UPSTREAM = Numerics(
    name="upstream",
    summary="every cast as upstream's JAX forward (bit-exact to it on the CPU)",
)

FAST = Numerics(
    name="fast",
    summary="native bf16 GEMMs, int8 weight-only kernels, bf16 expert hidden state (README: Fidelity, measured)",
    native_bf16_gemm=True,
    int8_matmul="kernel",
    expert_hidden_dtype="activation",
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
