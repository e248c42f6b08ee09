"""mergekit's configuration layout, read as a polytask merge: an existing ``mergekit-yaml`` config runs unchanged.

A mergekit config names ``merge_method``, ``base_model``, ``models`` (each ``model`` with ``parameters``),
shared ``parameters``, ``dtype`` and ``out_dtype``; the output directory is given on the command line
(``polytask merge CONFIG OUTPUT``, as ``mergekit-yaml CONFIG OUTPUT``). :func:`from_mergekit` turns it into
polytask's layout with the same meaning, for the methods both tools have:

=================  =========================================================================================
mergekit           polytask
=================  =========================================================================================
linear             average (``normalize: false``, a plain weighted sum, has no counterpart)
task_arithmetic    task_arithmetic (``normalize: true``: generalized with normalize)
ties               ties, with mergekit's defaults: density 1, normalize on
dare_ties          dare_ties with drop_rate = 1 - density and no magnitude trim; normalize off
dare_linear        dare with drop_rate = 1 - density (``normalize: true``: generalized)
breadcrumbs        breadcrumbs, with mergekit's defaults: density 1, gamma 0.01
breadcrumbs_ties   generalized: band sparsification + sign consensus
=================  =========================================================================================

What stays different (it is in the merge's log): DARE's random masks come from polytask's per-tensor seeded
streams and its survivors are rescaled by 1/(1-p) as in the paper (mergekit rescales them to the task
vector's L1 norm); the merge computes in float32 (``dtype: float64``: float64) whatever ``dtype`` says, and
writes ``out_dtype`` (else ``dtype``); ``int8_mask`` only saves memory in mergekit and is ignored. Anything
polytask cannot do the same way (slices, per-layer gradients of a parameter, tokenizer surgery, other
methods) is an error naming the key. Relative model paths are taken from the working directory, as mergekit
does, or else from the config's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polytask.errors import ConfigError
from polytask.registry import suggest

# mergekit's generalized task arithmetic methods and their defaults
_GTA: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"normalize": False, "rescale": False},
    "ties": {"normalize": True, "rescale": False},
    "dare_ties": {"normalize": False, "rescale": True},
    "dare_linear": {"normalize": False, "rescale": True},
    "breadcrumbs": {"normalize": False, "rescale": False},
    "breadcrumbs_ties": {"normalize": False, "rescale": False},
}
MERGEKIT_METHODS = ("linear", *_GTA)
_SHARED = {"normalize", "rescale", "lambda", "int8_mask"}
_PER_MODEL = {"weight", "density", "gamma"}
_UNSUPPORTED = {"slices": "layer slicing", "modules": "per-module merges", "tokenizer": "tokenizer surgery",
                "chat_template": "chat templates"}
_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "output", "options", *_UNSUPPORTED}
_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def is_mergekit(data: dict[str, Any]) -> bool:
    """Whether a config mapping is in mergekit's layout (it names ``merge_method``)."""
    return "merge_method" in data


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: mergekit's per-layer gradients and filtered values are not supported; "
                          "give one number")
    return value


def _path(ref: Any, where: str, root: Path) -> str:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: expected a model path")
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{where}: {ref!r} applies a LoRA with mergekit's 'model+lora' syntax; list the "
                          "adapter directory as a model of its own instead")
    p = Path(ref)
    if p.is_absolute() or p.exists():
        return str(p.absolute())
    return str(root / p)


def from_mergekit(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """A mergekit config mapping as a polytask merge config mapping (see the module docstring)."""
    unknown = [k for k in data if k not in _TOP]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}{suggest(unknown[0], sorted(_TOP))} in a mergekit-style "
                          "config")
    for key, what in _UNSUPPORTED.items():
        if data.get(key) is not None:
            raise ConfigError(f"{key}: mergekit's {what} is not supported by polytask merge")
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        raise ConfigError(f"tokenizer_source: {source!r} is not supported (polytask copies the base model's "
                          "tokenizer files, as tokenizer_source: base)")
    method = data["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise ConfigError(f"merge_method: mergekit's {method!r} has no polytask counterpart"
                          f"{suggest(method, MERGEKIT_METHODS)}; these run unchanged: "
                          f"{', '.join(MERGEKIT_METHODS)}")
    shared = {k: _scalar(v, f"parameters.{k}") for k, v in (data.get("parameters") or {}).items()}
    bad = [k for k in shared if k not in _SHARED | _PER_MODEL]
    if bad:
        raise ConfigError(f"parameters.{bad[0]}: not a parameter of mergekit's {method}"
                          f"{suggest(bad[0], sorted(_SHARED | _PER_MODEL))}")
    base = data.get("base_model")
    base_path = _path(base, "base_model", root) if base is not None else None
    entries = data.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise ConfigError("models: give at least one model (a list of {model: PATH, parameters: {...}})")
    models = []
    for i, m in enumerate(entries):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"models.{i}: expected {{model: PATH, parameters: {{...}}}}")
        extra = [k for k in m if k not in ("model", "parameters")]
        if extra:
            raise ConfigError(f"unknown key 'models.{i}.{extra[0]}'{suggest(extra[0], ['model', 'parameters'])}")
        own = {k: _scalar(v, f"models.{i}.parameters.{k}") for k, v in (m.get("parameters") or {}).items()}
        bad = [k for k in own if k not in _PER_MODEL]
        if bad:
            raise ConfigError(f"models.{i}.parameters.{bad[0]}: not a per-model parameter of mergekit's {method}"
                              f"{suggest(bad[0], sorted(_PER_MODEL))}")
        path = _path(m["model"], f"models.{i}.model", root)
        if method != "linear" and path == base_path:
            continue  # mergekit skips the base model in the list of task vectors
        models.append((i, path, {**{k: v for k, v in shared.items() if k in _PER_MODEL}, **own}))
    if not models:
        raise ConfigError("models: every model is the base model; nothing to merge")
    out: dict[str, Any] = {k: data[k] for k in ("output", "options") if k in data}
    dtype = data.get("out_dtype") or data.get("dtype")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in _DTYPES:
            raise ConfigError(f"{key}: {data[key]!r}; expected one of {', '.join(sorted(_DTYPES))}")
    if dtype:
        out["output"] = {**(out.get("output") or {}), "dtype": dtype}
    if data.get("dtype") == "float64":
        out["options"] = {**(out.get("options") or {}), "compute_dtype": "float64"}
    if base_path is not None:
        out["base"] = base_path
    if method == "linear":
        if not shared.get("normalize", True):
            raise ConfigError("parameters.normalize: false (mergekit's plain weighted sum) has no polytask "
                              "counterpart; average divides by the summed weights")
        out.update(method="average", params={},
                   models=[{"path": p, "weight": float(v.get("weight", 1.0))} for _, p, v in models])
        return out
    defaults = _GTA[method]
    normalize = bool(shared.get("normalize", defaults["normalize"]))
    rescale = bool(shared.get("rescale", defaults["rescale"]))
    lam = float(shared.get("lambda", 1.0))
    params: dict[str, Any] = {"lambda": lam}
    per_model: list[dict[str, Any]] = []
    for _, _, v in models:
        density = float(v.get("density", 1.0))
        per_model.append({"density": density, "gamma": float(v.get("gamma", 0.01))})
    if rescale and method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        raise ConfigError(f"parameters.rescale: true (rescaling the trimmed task vector to its L1 norm) is not "
                          f"supported for {method}")
    if method == "task_arithmetic":
        name, model_params = ("generalized", [{}] * len(models)) if normalize else ("task_arithmetic",
                                                                                  [{}] * len(models))
        if normalize:
            params.update(normalize=True)
    elif method == "ties":
        name = "ties"
        params.update(normalize=normalize)
        model_params = [{"density": d["density"]} for d in per_model]
    elif method == "dare_ties":
        name = "dare_ties"
        params.update(normalize=normalize, rescale=rescale, density=1.0)
        model_params = [{"drop_rate": 1.0 - d["density"]} for d in per_model]
    elif method == "dare_linear":
        name = "generalized" if normalize else "dare"
        params.update(rescale=rescale, **({"sparsify": ["random"], "normalize": True} if normalize else {}))
        model_params = [{"drop_rate": 1.0 - d["density"]} for d in per_model]
    elif method == "breadcrumbs" and not normalize:
        name = "breadcrumbs"
        model_params = [{"density": d["density"], "gamma": d["gamma"]} for d in per_model]
    else:  # breadcrumbs with normalize, breadcrumbs_ties
        name = "generalized"
        params.update(sparsify=["band"], consensus=method == "breadcrumbs_ties", normalize=normalize)
        model_params = [{"density": d["density"], "gamma": d["gamma"]} for d in per_model]
    out.update(method=name, params=params,
               models=[{"path": p, "weight": float(v.get("weight", 1.0)), "params": mp}
                       for (_, p, v), mp in zip(models, model_params, strict=True)])
    return out


def mergekit_notes(data: dict[str, Any]) -> list[str]:
    """What a user arriving from mergekit should know about this config's merge (for the log)."""
    notes = []
    method = data.get("merge_method")
    if method in ("dare_ties", "dare_linear"):
        notes.append("DARE: masks from polytask's seeded per-tensor streams (options.seed); survivors rescaled "
                     "by 1/(1-p) as in the paper (mergekit: to the L1 norm)")
    if data.get("dtype") not in (None, "float32", "float64"):
        notes.append(f"computing in float32 (mergekit computes in dtype {data['dtype']}), writing "
                     f"{data.get('out_dtype') or data['dtype']}")
    return notes
