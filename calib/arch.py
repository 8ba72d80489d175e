"""Model architectures: the Hugging Face ``config.json`` facts the roofline needs.

Bundled models live in ``calib/data/models.yaml`` under calib's own names
(``llama-2-7b``, ...). Any other model is read from a user's ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from calib.errors import CalibError

_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class Architecture:
    """Transformer facts used by the roofline (names follow HF config.json).

    Invariants: ``num_attention_heads`` divides ``hidden_size``;
    ``num_key_value_heads`` divides ``num_attention_heads``; experts are both
    absent (dense, ``num_local_experts == 0``) or both present.
    """

    name: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    vocab_size: int = 0
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def bytes_per_param(self) -> int:
        return _DTYPE_BYTES.get(self.torch_dtype, 2)

    def check_tp(self, tp: int, *, source: str | Path | None = None) -> None:
        """Raise CalibError unless ``tp`` is a valid tensor-parallel degree for this model."""
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise CalibError(
                f"tensor_parallelism must be a positive integer, got {tp!r}",
                path=source,
                field="tensor_parallelism",
            )
        if tp & (tp - 1) or tp > 64:
            raise CalibError(
                f"tensor_parallelism {tp} is not a power of two (1, 2, 4, 8, ...)",
                path=source,
                field="tensor_parallelism",
                fix="use the TP degree vLLM ran with",
            )
        if self.num_attention_heads % tp:
            raise CalibError(
                f"tensor_parallelism {tp} does not divide the {self.num_attention_heads} attention "
                f"heads of {self.name}",
                path=source,
                field="tensor_parallelism",
                fix="check the model and TP in exp-config.yaml",
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _from_mapping(name: str, cfg: dict, source: str | Path) -> Architecture:
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise CalibError(
            f"config is missing required field(s) {', '.join(missing)}",
            path=source,
            field=missing[0],
            fix="use the model's Hugging Face config.json",
        )
    vals = {}
    for key in (
        *_REQUIRED,
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
    ):
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CalibError(f"must be a non-negative integer, got {v!r}", path=source, field=key)
        vals[key] = v
    vals.setdefault("num_key_value_heads", vals["num_attention_heads"])
    for key in _REQUIRED:
        if vals[key] <= 0:
            raise CalibError("must be positive", path=source, field=key)
    h, kvh, d = vals["num_attention_heads"], vals["num_key_value_heads"], vals["hidden_size"]
    if d % h:
        raise CalibError(
            f"hidden_size {d} is not a multiple of num_attention_heads {h}",
            path=source,
            field="num_attention_heads",
        )
    if kvh == 0 or h % kvh:
        raise CalibError(
            f"num_key_value_heads {kvh} must divide num_attention_heads {h}",
            path=source,
            field="num_key_value_heads",
        )
    e, k = vals.get("num_local_experts", 0), vals.get("num_experts_per_tok", 0)
    if (e > 0) != (k > 0) or k > e:
        raise CalibError(
            f"inconsistent MoE fields: num_local_experts={e}, num_experts_per_tok={k}",
            path=source,
            field="num_experts_per_tok",
        )
    dtype = cfg.get("torch_dtype") or "bfloat16"
    return Architecture(name=name, torch_dtype=str(dtype), **vals)


@cache
def _bundled() -> dict[str, dict]:
    text = resources.files("calib").joinpath("data/models.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def bundled_models() -> tuple[str, ...]:
    """Names of the bundled architectures."""
    return tuple(_bundled())


def resolve_model_name(model_id: str) -> str | None:
    """Map an HF id (``meta-llama/Llama-2-7b-hf``) or a calib name to a bundled name."""
    wanted = model_id.strip().lower()
    tail = wanted.rsplit("/", 1)[-1]
    for name, entry in _bundled().items():
        if wanted == name:
            return name
        for hf_id in entry.get("hf_ids", []):
            if hf_id.lower() == wanted or hf_id.lower().rsplit("/", 1)[-1] == tail:
                return name
    return None


def load_architecture(model: str, config_path: str | Path | None = None) -> Architecture:
    """The architecture of ``model`` (calib name or HF id), or of a user config.json.

    Raises CalibError naming the fix when the model is unknown and no config is given.
    """
    if config_path is not None:
        path = Path(config_path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibError("model config file not found", path=path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibError(f"not valid JSON ({exc})", path=path) from None
        if not isinstance(cfg, dict):
            raise CalibError("config.json must hold a JSON object", path=path)
        cfg_name = resolve_model_name(model) or model.rsplit("/", 1)[-1].lower()
        return _from_mapping(cfg_name, cfg, path)
    name = resolve_model_name(model)
    if name is None:
        raise CalibError(
            f"unknown model {model!r}; bundled: {', '.join(bundled_models())}",
            field="model",
            fix="pass the model's Hugging Face config.json (--model-config PATH)",
        )
    entry = {k: v for k, v in _bundled()[name].items() if k != "hf_ids"}
    return _from_mapping(name, entry, f"calib/data/models.yaml[{name}]")
