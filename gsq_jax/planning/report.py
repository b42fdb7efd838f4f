"""Plans as a table on stdout and as plan.csv / plan.json files (atomic writes)."""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

from gsq_jax.planning import plan as plan_lib
from gsq_jax.utils.files import atomic_write_json, atomic_write_text

CSV_NAME, JSON_NAME = "plan.csv", "plan.json"

_COLUMNS = (  # (header, row key, format)
    ("run", "label", "{}"), ("target", "target", "{}"), ("mesh", "mesh", "{}"),
    ("batch", "batch", "{}"), ("/dev", "per_device_batch", "{}"),
    ("need GiB", "need_gib", "{:.1f}"), ("usable GiB", "usable_gib", "{:.1f}"),
    ("fits", "fits", "{}"), ("mem frac", "memory_fraction", "{}"),
    ("remat", "remat_fusions", "{}"),
    ("TFLOP/step", "flops_per_step", "{:.4g}"), ("GFLOP/img", "flops_per_image", "{:.4g}"),
    ("step s*", "step_s_roofline", "{:.3g}"), ("img/s*", "img_per_s_roofline", "{:.0f}"),
    ("dev-h*", "device_hours_roofline", "{:.3g}"), ("dev-h@mfu", "device_hours_at_mfu", "{:.3g}"),
    ("fix", "fix", "{}"),
)
_SCALE = {"flops_per_step": 1e-12, "flops_per_image": 1e-9}


def _cell(row: dict, key: str, fmt: str) -> str:
  value = row.get(key)
  if value is None or value == "":
    return "-"
  if key in _SCALE:
    value = value * _SCALE[key]
  return fmt.format(value)


def rows(plans: Sequence[plan_lib.Plan]) -> list[dict]:
  """One row per plan, followed by the rows of its fitting alternative or option, if any."""
  out = []
  for p in plans:
    out.append(p.row())
    out.extend(q.row() for q in (p.alternative, p.option) if q is not None)
  return out


def format_table(plans: Sequence[plan_lib.Plan]) -> str:
  """Fixed-width table; * marks roofline figures (an optimistic bound, not a measurement)."""
  table = [[h for h, _, _ in _COLUMNS]]
  table += [[_cell(r, k, f) for _, k, f in _COLUMNS] for r in rows(plans)]
  widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
  primary = [p for p in plans]
  total = sum((p.alternative or p).device_hours_at_mfu for p in primary)
  total_roof = sum((p.alternative or p).device_hours_roofline for p in primary)
  lines.append(f"total: {len(primary)} run(s), {total_roof:.1f} device-hours at the roofline, "
               f"{total:.1f} at {primary[0].mfu:.0%} MFU (fitting alternatives where needed)"
               if primary else "total: no runs")
  lines.append("* roofline: max(FLOPs/peak, operand bytes/bandwidth) per device, "
               "published peaks; not measured")
  for p in plans:
    for failed in filter(None, [p.errors, p.alternative and p.alternative.errors,
                                p.option and p.option.errors]):
      lines.append(f"{p.label}: {failed}")
  return "\n".join(lines)


def write(plans: Sequence[plan_lib.Plan], out_dir: str) -> tuple[str, str]:
  """Writes plan.csv and plan.json into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  records = [{k: plan_lib.as_jsonable(v) for k, v in r.items()} for r in rows(plans)]
  keys = list(dict.fromkeys(k for r in records for k in r))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=keys)
  writer.writeheader()
  writer.writerows(records)
  csv_path, json_path = os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, JSON_NAME)
  atomic_write_text(csv_path, buffer.getvalue())
  atomic_write_json(json_path, {"plans": records})
  return csv_path, json_path
