"""Codebook-usage tables that always carry their sample size.

Coverage ("usage": codes used at least once / V) grows with the number of
indices it was measured on, so a usage number alone does not compare across
evaluation sets: 84% on 12.8M draws and 22% on 65k draws at V = 2^18 may both
be perfectly uniform. `usage_summary` puts every usage next to its draw count
T, T/V, the uniform-usage expectation 1 − exp(−T/V) and the ratio of the two,
plus perplexity and entropy (which do not saturate the same way). It works on
`gsq-collect` tables and on the published tables of `paper_table`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gsq_jax.analysis import tables

_KEYS = ("source", "method", "run", "imported_from", "quantizer", "f", "D", "G", "d", "V", "seed",
         "res", "init", "norm", "steps", "eval_source", "eval_images", "eval_resolution")
# Codebook-health columns carried through when the table has them (gsq-collect).
_HEALTH = ("unused_codes", "train_usage", "train_usage_lookups",
           "train_usage_uniform_expectation", "train_dead_codes", "codebook_norm_cv")


def entropy_bits(perplexity):
  """Entropy of the code histogram in bits, log2(perplexity).

  The project's perplexity is exp(H) with H in nats (natural log, GSQ.md
  §1.8), so H[bits] = log2(perplexity); its maximum is log2 V (uniform use).
  """
  return np.log2(np.asarray(perplexity, dtype=np.float64))


def usage_summary(df: pd.DataFrame) -> pd.DataFrame:
  """One row per run: usage with its draw count, uniform expectation and entropy.

  Args:
    df: a scaling table (`load_table`) or a published table (`paper_table`)
      with columns V, usage [%] and the counts (`lookups`, or `tokens` and G).

  Returns:
    The key columns present (source, run, quantizer, f, D, G, d, V, seed,
    steps, eval_source, eval_images) followed by
      tokens, lookups            latent positions N and indices N·G counted;
      draws_per_code             lookups / V (T/V);
      usage                      [%] codes used at least once (pooled over groups);
      usage_uniform_expectation  [%] 100·(1 − exp(−lookups/V)), recomputed;
      usage_vs_uniform           usage / expectation (1 = as covered as uniform);
      perplexity, entropy_bits, max_entropy_bits (log2 V), entropy_fraction;
      group_usage_mean and its expectation (T = tokens) when present.

  Raises:
    ValueError: no usage column, or no draw counts (usage without its sample
      size is exactly what this table refuses to report).
  """
  if not isinstance(df, pd.DataFrame):
    raise ValueError(f"usage_summary: `df` must be a pandas DataFrame, got {type(df).__name__}")
  for col in ("V", "usage"):
    if col not in df.columns:
      raise ValueError(f"usage_summary: the table lacks the {col!r} column; it has "
                       f"{list(df.columns)}")
  draws = tables.usage_draws(df, "shared")
  V = pd.to_numeric(df["V"], errors="coerce")
  out = df[[c for c in _KEYS if c in df.columns]].copy()
  if "tokens" in df.columns:
    out["tokens"] = pd.to_numeric(df["tokens"], errors="coerce")
  elif "G" in df.columns:
    out["tokens"] = draws / pd.to_numeric(df["G"], errors="coerce")
  out["lookups"] = draws
  out["draws_per_code"] = draws / V
  out["usage"] = pd.to_numeric(df["usage"], errors="coerce")
  known = draws.notna() & V.notna()
  expectation = pd.Series(np.nan, index=df.index)
  expectation[known] = tables.uniform_usage_expectation(
      draws[known].to_numpy(), V[known].to_numpy(), percent=True)
  out["usage_uniform_expectation"] = expectation
  out["usage_vs_uniform"] = out["usage"] / expectation.where(expectation > 0)
  if "perplexity" in df.columns:
    perplexity = pd.to_numeric(df["perplexity"], errors="coerce")
    out["perplexity"] = perplexity
    out["entropy_bits"] = entropy_bits(perplexity)
    out["max_entropy_bits"] = np.log2(V)
    out["entropy_fraction"] = out["entropy_bits"] / out["max_entropy_bits"]
  if "group_usage_mean" in df.columns and "tokens" in df.columns:
    out["group_usage_mean"] = pd.to_numeric(df["group_usage_mean"], errors="coerce")
    out = out.join(tables.add_uniform_usage_expectation(df, kind="group")[
        ["group_usage_uniform_expectation"]])
  for col in _HEALTH:
    if col in df.columns:
      out[col] = pd.to_numeric(df[col], errors="coerce")
  return out.reset_index(drop=True)


def matched_bits(summary: pd.DataFrame) -> pd.DataFrame:
  """Adds the bit budget of each row and its multiple of the IBQ rows' budget.

  A tokenizer spends (res / f)² tokens x G lookups x log2 V bits per image
  (IBQ at 2^18, f = 16, 256²: 16·16·18 = 4,608), res being the resolution it
  was evaluated at (`eval_resolution`, else the training `res`). Comparing usage at equal
  budget keeps a quantizer from looking better only because it spends more
  bits. Columns added: tokens_per_image, bits_per_image, bits_multiple
  (bits_per_image / the smallest IBQ budget in the table, NaN without an IBQ
  row) and effective_bits_per_image = tokens_per_image x G x entropy_bits,
  the budget the code histogram actually fills (entropy of the histogram
  pooled over groups, per lookup).

  Args:
    summary: `usage_summary` output (or any table) with res, f, G, V columns.
  """
  for col in ("res", "f", "G", "V"):
    if col not in summary.columns:
      raise ValueError(f"matched_bits: the table lacks the {col!r} column; it has "
                       f"{sorted(summary.columns)}")
  out = summary.copy()
  res, f, G, V = (pd.to_numeric(out[c], errors="coerce") for c in ("res", "f", "G", "V"))
  if "eval_resolution" in out.columns:
    res = pd.to_numeric(out["eval_resolution"], errors="coerce").fillna(res)
  out["tokens_per_image"] = (res / f) ** 2
  out["bits_per_image"] = out["tokens_per_image"] * G * np.log2(V)
  ibq = out["bits_per_image"][out.get("quantizer") == "ibq"] if "quantizer" in out else []
  reference = float(np.nanmin(ibq)) if len(ibq) and np.isfinite(ibq).any() else np.nan
  out["bits_multiple"] = out["bits_per_image"] / reference
  if "entropy_bits" in out.columns:
    out["effective_bits_per_image"] = out["tokens_per_image"] * G * out["entropy_bits"]
  return out
