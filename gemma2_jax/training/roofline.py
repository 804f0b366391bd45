"""Where a compiled step's time must go, per chip: a roofline from the compiled program itself.

From the optimized HLO of one device's program (SPMD: every shape is per chip), with every loop body
counted `known_trip_count` times:
  - HBM bytes: what each top-level instruction (a fusion, a dot, a copy, a collective, ...) reads
    and writes; fused computations stay on chip. Scheduling can hide some of it, never remove it.
  - collective bytes by kind: what the chip sends over the interconnect for each collective, for a
    ring over the op's replica group of n chips: all-gather out*(n-1)/n, reduce-scatter out*(n-1),
    all-reduce 2*out*(n-1)/n, all-to-all out*(n-1)/n, collective-permute out.
With the chip's peak FLOP/s, HBM and interconnect bandwidth (`flops.CHIPS`), each gives a time; the
step cannot be faster than the largest, which bounds the MFU the step can reach.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
          "u16": 2, "s8": 1, "u8": 1, "pred": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1}
# Instructions that move no data through HBM (aliases, bookkeeping, control flow's own operands).
_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "conditional",
         "call", "after-all", "partition-id", "replica-id", "opt-barrier", "iota"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_CALLEES = re.compile(
  r"(?:body|condition|to_apply|branch_computations|calls)=\{?([^,}\s]+(?:,\s*%[\w.\-]+)*)")
# dtype[dims] and its layout, whose S(1) marks an on-chip (TPU VMEM) buffer: no HBM traffic.
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Per chip, per step: FLOPs (given), HBM bytes and collective bytes by kind (from the HLO)."""

  flops: float
  hbm_bytes: float
  collective_bytes: dict[str, float]

  def times(self, chip: dict) -> dict[str, float]:
    """Seconds each resource needs at the chip's peak (`flops.CHIPS` entry)."""
    return {"compute": self.flops / chip["flops"], "hbm": self.hbm_bytes / chip["hbm"],
            "collectives": sum(self.collective_bytes.values()) / chip["ici"]}

  def lines(self, chip: dict, model_flops: float) -> list[str]:
    """The report: each bound, the step-time lower bound, and the MFU it allows `model_flops`."""
    t = self.times(chip)
    bound = max(t.values())
    kinds = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in self.collective_bytes.items() if v) or "none"
    return [
      f"roofline per chip: compute {t['compute'] * 1e3:.1f} ms ({self.flops / 1e12:.1f} TFLOP), HBM "
      f"{t['hbm'] * 1e3:.1f} ms ({self.hbm_bytes / 1e9:.1f} GB), collectives "
      f"{t['collectives'] * 1e3:.1f} ms ({kinds})",
      f"  step >= {bound * 1e3:.1f} ms ({max(t, key=t.get)}-bound): MFU at most "
      f"{model_flops / chip['flops'] / bound:.0%}",
    ]


def _shape_bytes(text: str) -> float:
  return sum(_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
             for d, dims, layout in _SHAPE.findall(text) if "S(1)" not in layout)


def _trip_count(line: str, comps: dict[str, list[str]]) -> float:
  """A while loop's trip count: XLA's known_trip_count, else the bound its condition compares the
  counter with (a scan's `i < n`); 1 when neither is there."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  if known:
    return float(known[1])
  cond = re.search(r"condition=%?([\w.\-]+)", line)
  bounds = [int(c) for ln in comps.get(cond[1] if cond else "", ())
            for c in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", ln)]
  return float(bounds[0]) if len(bounds) == 1 else 1.0


def _group_size(attrs: str) -> int:
  """Chips in the op's replica group: {{0,1},{2,3}}, [groups,size]<=[n], or mesh[...] {'axes'}."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m[1].split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:
    return int(m[1].split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = {k.strip("' "): int(v) for k, v in (kv.split("=") for kv in m[1].split(","))}
    return math.prod(sizes[a.strip("' ")] for a in m[2].split(",") if a.strip())
  return 1


def _moved(op: str, out: float, n: int) -> float:
  if op == "collective-permute":
    return out
  if n <= 1:
    return 0.0
  return {"all-gather": out * (n - 1) / n, "reduce-scatter": out * (n - 1),
          "all-reduce": 2 * out * (n - 1) / n, "all-to-all": out * (n - 1) / n}[op]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps, name, entry = {}, None, ""
  for line in hlo.splitlines():
    m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and not line.startswith(" "):
      name = m[2]
      comps[name] = []
      entry = name if m[1] else entry
    elif name is not None and line.strip() and line.strip() != "}":
      comps[name].append(line)
  return comps, entry


def analyze(hlo: str, flops: float) -> Roofline:
  """The Roofline of one device's optimized HLO text (`compiled.as_text()`) doing `flops`."""
  comps, entry = _computations(hlo)
  times: dict[str, float] = {entry: 1.0}  # how often each control-flow computation runs
  order, at = [entry], 0
  while at < len(order):
    c = order[at]
    at += 1
    for line in comps.get(c, ()):
      m = _INSTR.match(line)
      if not m or m[3] not in ("while", "conditional", "call"):
        continue
      n = _trip_count(line, comps) if m[3] == "while" else 1.0
      for callee in _CALLEES.findall(line):
        for name in (x.strip().lstrip("%") for x in callee.split(",")):
          if name in comps and name not in times:
            times[name] = times[c] * n
            order.append(name)
  hbm, coll = 0.0, dict.fromkeys(COLLECTIVES, 0.0)
  for c, k in times.items():
    shapes = {}
    for line in comps[c]:
      m = _INSTR.match(line)
      if not m:
        continue
      name, out, op, rest = m[1], m[2], m[3], m[4]
      shapes[name] = _shape_bytes(out)
      if op in _FREE or op.endswith("-done") and op.removesuffix("-done") in COLLECTIVES:
        continue
      base = op.removesuffix("-start")
      sizes = [shapes.get(x.strip().lstrip("%"), 0.0) for x in rest.split(")", 1)[0].split(",")
               if x.strip()]
      read, written = sum(sizes), shapes[name]
      if "dynamic-update-slice" in name or op == "dynamic-update-slice":
        # In place (e.g. a scan stacking its per-layer outputs): the update moves, not the buffer.
        read = written = read - max(sizes, default=0.0)
      elif "dynamic-slice" in name or op == "dynamic-slice":
        read = written  # reads the slice it returns (e.g. a scan taking one layer's weights)
      if base in COLLECTIVES:
        if op.endswith("-start"):  # async: (operands..., outputs...) — the output half
          written = _shape_bytes(out) - read if base != "all-reduce" else read
        coll[base] += k * _moved(base, written, _group_size(line))
      hbm += k * (read + written)
  return Roofline(flops=flops, hbm_bytes=hbm, collective_bytes=coll)

