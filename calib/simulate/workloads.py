"""Simulation recipes: a YAML file listing models x workloads -> ExperimentSpecs.

Recipe format (see ``traces/default.yaml``)::

    seed: 20261122                 # base seed (``--seed`` overrides)
    hardware: H100-SXM
    started: 20261101-090000       # timestamp of the first experiment directory
    spacing_minutes: 20            # later experiments start this much later each
    vllm: {max_num_batched_tokens: 2048, max_num_seqs: 128, max_model_len: 4096,
           gpu_memory_utilization: 0.9}
    scales: {default: 1.0, real: 8.0}   # multipliers of every stage duration
    models:                        # list of {model: HF id, tp: N}
      - {model: meta-llama/Llama-2-7b-hf, tp: 1}
    workloads:                     # name -> shared_prefix + stages
      general:
        shared_prefix: {num_unique_system_prompts: 8, num_users_per_system_prompt: 16,
                        system_prompt_len: 100, question_len: 447, output_len: 248}
        stages: [{rate: 8, duration: 30}, {rate: 20, duration: 30}]

Experiments are the cross product models x workloads in file order; experiment
``i`` gets ``seed_offset = i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from calib.errors import CalibError
from calib.simulate.scheduler import SHARED_PREFIX_KEYS, ExperimentSpec

_VLLM_KEYS = ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "gpu_memory_utilization")


def load_recipe(recipe: str | Path | Mapping) -> tuple[dict, str]:
    """Read a recipe (path or dict); return (mapping, source name for messages)."""
    if isinstance(recipe, Mapping):
        return dict(recipe), "<recipe>"
    path = Path(recipe)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibError(
            "recipe file not found",
            path=path,
            fix="pass --recipe traces/default.yaml or an existing file",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise CalibError(
            f"not valid YAML ({getattr(exc, 'problem', exc)})",
            path=path,
            line=None if mark is None else mark.line + 1,
        ) from None
    if not isinstance(data, dict):
        raise CalibError("recipe must be a YAML mapping", path=path)
    return data, str(path)


def _pos_number(v, src, fld, integer=False):
    ok = (isinstance(v, int) if integer else isinstance(v, int | float)) and not isinstance(v, bool)
    if not ok or not v > 0:
        raise CalibError(
            f"must be a positive {'integer' if integer else 'number'}, got {v!r}",
            path=src,
            field=fld,
        )
    return v


def recipe_specs(
    recipe: str | Path | Mapping, *, scale: str = "default"
) -> tuple[list[ExperimentSpec], int]:
    """The experiments of a recipe at a scale, and the recipe's seed.

    Raises CalibError naming the field at fault for any malformed entry.
    """
    data, src = load_recipe(recipe)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CalibError(f"must be a non-negative integer, got {seed!r}", path=src, field="seed")
    scales = data.get("scales", {"default": 1.0})
    if not isinstance(scales, dict) or scale not in scales:
        raise CalibError(
            f"unknown scale {scale!r}; recipe has "
            f"{', '.join(scales) if isinstance(scales, dict) else 'none'}",
            path=src,
            field="scales",
            fix="use --scale default or add it to scales",
        )
    factor = float(_pos_number(scales[scale], src, f"scales.{scale}"))
    hardware = data.get("hardware", "H100-SXM")
    if not isinstance(hardware, str):
        raise CalibError("must be a string", path=src, field="hardware")
    vllm = data.get("vllm", {}) or {}
    if not isinstance(vllm, dict):
        raise CalibError("must be a mapping", path=src, field="vllm")
    unknown = set(vllm) - set(_VLLM_KEYS)
    if unknown:
        raise CalibError(
            f"unknown key(s) {', '.join(sorted(unknown))}",
            path=src,
            field="vllm",
            fix=f"use {', '.join(_VLLM_KEYS)}",
        )
    limits = {}
    for k in _VLLM_KEYS:
        if k in vllm:
            limits[k] = _pos_number(
                vllm[k], src, f"vllm.{k}", integer=k != "gpu_memory_utilization"
            )
    started = str(data.get("started", "20261101-090000"))
    try:
        t0 = datetime.strptime(started, "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise CalibError(
            f"bad timestamp {started!r}", path=src, field="started", fix="use YYYYMMDD-HHMMSS"
        ) from None
    spacing = float(_pos_number(data.get("spacing_minutes", 20), src, "spacing_minutes"))

    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise CalibError("must be a non-empty list of {model, tp}", path=src, field="models")
    workloads = data.get("workloads")
    if not isinstance(workloads, dict) or not workloads:
        raise CalibError(
            "must be a non-empty mapping name -> {shared_prefix, stages}",
            path=src,
            field="workloads",
        )
    specs: list[ExperimentSpec] = []
    for mi, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            raise CalibError(
                "each entry needs `model` (HF id) and `tp`", path=src, field=f"models[{mi}]"
            )
        tp = _pos_number(m.get("tp", 1), src, f"models[{mi}].tp", integer=True)
        for wname, w in workloads.items():
            fld = f"workloads.{wname}"
            if not isinstance(w, dict):
                raise CalibError(
                    "must be a mapping with shared_prefix and stages", path=src, field=fld
                )
            sp = w.get("shared_prefix")
            if not isinstance(sp, dict):
                raise CalibError("missing mapping", path=src, field=f"{fld}.shared_prefix")
            missing = [k for k in SHARED_PREFIX_KEYS if k not in sp]
            if missing:
                raise CalibError(
                    f"missing {', '.join(missing)}", path=src, field=f"{fld}.shared_prefix"
                )
            for k in SHARED_PREFIX_KEYS:
                if k == "system_prompt_len" and sp[k] == 0:
                    continue
                _pos_number(sp[k], src, f"{fld}.shared_prefix.{k}", integer=True)
            stages = w.get("stages")
            if not isinstance(stages, list) or not stages:
                raise CalibError(
                    "must be a non-empty list of {rate, duration}", path=src, field=f"{fld}.stages"
                )
            st = []
            for si, s in enumerate(stages):
                if not isinstance(s, dict):
                    raise CalibError(
                        "must be {rate, duration}", path=src, field=f"{fld}.stages[{si}]"
                    )
                rate = _pos_number(s.get("rate"), src, f"{fld}.stages[{si}].rate")
                dur = _pos_number(s.get("duration"), src, f"{fld}.stages[{si}].duration")
                st.append((float(rate), float(dur) * factor))
            i = len(specs)
            specs.append(
                ExperimentSpec(
                    model=m["model"],
                    tp=int(tp),
                    workload=str(wname),
                    shared_prefix={k: int(sp[k]) for k in SHARED_PREFIX_KEYS},
                    stages=tuple(st),
                    hardware=str(m.get("hardware", hardware)),
                    seed_offset=i,
                    started=(t0 + timedelta(minutes=spacing * i)).strftime("%Y%m%d-%H%M%S"),
                    **limits,
                )
            )
    return specs, int(seed)
