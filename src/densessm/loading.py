"""Strict loading of a saved model for the command line: exactly the model its directory describes, or an error.

``from_pretrained`` follows transformers' conventions: a missing or unexpected tensor is a warning table,
and the missing ones are filled with fresh random values. That is right for fine-tuning a different head,
and wrong for ``densessm generate``/``eval``/``train``, where a damaged directory would print garbage or a
perplexity with exit code 0. Here the checkpoint's tensor names, shapes and dtypes are read from the file
headers (nothing is allocated) and compared with what the configuration builds; any difference is a
:class:`~densessm.errors.ModelLoadError` naming the tensors. A tensor is taken in any floating-point dtype
(loading casts it, as for a copy in another precision), but integer values are not cast into floating-point
weights: a quantized or damaged tensor would load as zeros or garbage. The Python API keeps transformers'
behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from densessm.errors import ModelLoadError, NonFiniteError
from densessm.files import read_json
from densessm.models import MODEL_TYPES

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_SHOWN = 8  # tensor names listed in an error before "and N more"


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")
"""The values a saved config's ``dtype`` may take."""


def read_config(model_dir: str | Path) -> PretrainedConfig:
    """The configuration in ``model_dir/config.json``, which must describe a densessm model."""
    path = Path(model_dir)
    if not path.exists() and path.is_symlink():  # a loop, or a link to a missing target
        raise FileNotFoundError(f"model directory {path} is a symlink that leads nowhere (to {os.readlink(path)})")
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a model directory")
    config_file = path / "config.json"
    if config_file.exists() and not config_file.is_file():  # a folder, or a link to a device or pipe
        raise ModelLoadError(f"{config_file} is not a regular file: a model's config.json is a JSON file")
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model saved with save_pretrained()")
    raw = json_object(config_file)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{config_file} describes model_type {model_type!r}, not a densessm model ({', '.join(MODEL_TYPES)}); "
            "a public-reference DenseRetNet checkpoint is imported with `densessm convert`"
        )
    for key in ("dtype", "torch_dtype"):  # transformers' own refusal, at instantiation, names no file
        value = raw.get(key)
        if value is not None and value not in FLOAT_DTYPES:
            raise ModelLoadError(
                f"{config_file}: {key} {value!r} is not a floating-point dtype the weights can have "
                f"({', '.join(FLOAT_DTYPES)})"
            )
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # the config classes raise ValueError, TypeError or a strict-dataclass error
        cause = err.__cause__ or err  # a strict-dataclass error wraps the one-line ValueError of the validator
        raise ModelLoadError(f"{config_file} is not a valid {model_type} configuration: {cause}") from None


VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer_dir(directory: str | Path, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``directory``, or one line saying why not. Code shipped with a tokenizer
    (``auto_map``) is never run: ``transformers`` would otherwise ask on the terminal whether to run it."""
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"tokenizer directory {path} is a file, not a directory")
    vocabularies = [path / name for name in VOCABULARY_FILES]
    for file in vocabularies:
        if file.exists() and not file.is_file():  # a folder, or a link to a device or pipe: not "no tokenizer"
            raise ModelLoadError(f"{file} is not a regular file: a tokenizer's vocabulary is a file")
    if not any(file.is_file() for file in vocabularies):
        raise FileNotFoundError(
            f"{path} has no tokenizer ({' / '.join(VOCABULARY_FILES)}): save it next to the model with "
            "tokenizer.save_pretrained(DIR), or name a tokenizer directory"
        )
    settings = path / "tokenizer_config.json"
    if settings.is_file():
        try:
            config = read_json(settings)
        except ValueError as err:
            raise ValueError(f"{settings} is not valid JSON: {err}") from None
        if isinstance(config, dict) and "auto_map" in config:
            raise ValueError(
                f"the tokenizer in {path} needs its own Python code ({settings.name} has an auto_map); densessm "
                "never runs code from a model or tokenizer directory: use a tokenizer without custom code"
            )
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)
    except Exception as err:  # tokenizers raise OSError, ValueError, TypeError or their own exceptions
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the tokenizer in {path}: {first}") from None


def special_token_beyond(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> str | None:
    """A special token of ``tokenizer`` (padding, end or start of text, unknown) whose id the model's vocabulary
    lacks, named with its id; None if there is none. Such a token is typically one ``tokenizer_config.json``
    names but the vocabulary does not hold: transformers then adds it at load, beyond the model's ids."""
    for role in ("eos_token", "bos_token", "pad_token", "unk_token"):
        token, token_id = getattr(tokenizer, role, None), getattr(tokenizer, f"{role}_id", None)
        if token is not None and isinstance(token_id, int) and token_id >= vocab_size:
            return f"its {role} {str(token)!r} has id {token_id}, beyond the model's vocab_size {vocab_size}"
    return None


def unsafe_pickle(file: Path, err: Exception) -> str:
    """One line for a pickle that a weights-only load refused: torch's own text is several lines and advises
    loading without ``weights_only``, which must never happen to an untrusted file."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    if marker is not None:
        rest = lines[marker].split("WeightsUnpickler error:", 1)[1].strip() or " ".join(lines[marker + 1 : marker + 2])
        reason = f"it holds what a weights-only load refuses ({rest})"
    else:
        reason = lines[0] if lines else type(err).__name__
    return f"cannot read {file} safely (weights_only=True): {reason}; it was not loaded (no code in it ran)"


def json_object(file: Path, error: type[ValueError] = ModelLoadError) -> dict:
    """The JSON object of a settings file, or ``error`` naming the file."""
    try:
        data = read_json(file)
    except ValueError as err:
        raise error(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{file} holds a JSON {type(data).__name__}, not an object of settings")
    return data


GENERATION_TOKEN_FIELDS = (
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "decoder_start_token_id",
)
"""The fields of a ``generation_config.json`` that hold token ids (an int, or lists of them)."""


def _token_ids(value: object) -> list[object]:
    if isinstance(value, list | tuple):
        return [i for item in value for i in _token_ids(item)]
    return [] if value is None else [value]


def _check_generation_config(path: Path, vocab_size: int) -> None:
    """A ``generation_config.json`` that is there must be readable: ``from_pretrained`` would skip a broken
    one without a word, and generate with other settings than the ones saved. Its values and token ids are
    checked here too, so that an error names the file (at generation it blamed the command's own flags)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return
    data = json_object(file)
    try:
        GenerationConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ModelLoadError(f"{file}: {str(err).strip().splitlines()[0]}") from None
    for field in GENERATION_TOKEN_FIELDS:
        for token in _token_ids(data.get(field)):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ModelLoadError(
                    f"{file}: {field} holds {token!r}, which is no token id of the model's vocabulary [0, {vocab_size})"
                )


def _shard_files(path: Path, index_name: str) -> list[Path]:
    index_file = path / index_name
    try:
        index = read_json(index_file)
        weight_map = index["weight_map"]
        if not isinstance(index.get("metadata"), dict):
            raise ModelLoadError(f"{index_file} has no 'metadata' object (transformers needs one, e.g. {{}})")
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelLoadError(f"{index_file} is not a valid weight index: {err!r}") from None
    files = []
    for shard in shards:
        name = PurePosixPath(str(shard))
        if name.is_absolute() or ".." in name.parts:
            raise ModelLoadError(f"{index_file} names the shard {shard!r} outside {path}: refused")
        if len(name.parts) != 1:
            raise ModelLoadError(
                f"{index_file} names the shard {shard!r} in a folder: shards lie beside their index, as "
                "save_pretrained writes them"
            )
        if not (path / name).is_file():
            raise ModelLoadError(f"shard {shard} listed in {index_file} is missing")
        files.append(path / name)
    return files


class StoredTensor(NamedTuple):
    """A tensor of a weight file as its header describes it."""

    shape: tuple[int, ...]
    dtype: str  # as the file names it: "F32", "I8"... in safetensors, "float32", "int8"... in a torch pickle
    floating: bool  # whether it holds floating-point values


def _safetensors_floating(dtype: str) -> bool:
    # the safetensors format's dtype names: F16, BF16, F32, F64, F8_* are floating; I*, U*, BOOL and C64 are not
    return dtype.startswith(("F", "BF"))


def checkpoint_tensors(model_dir: str | Path) -> dict[str, StoredTensor]:
    """Name -> shape and dtype of every tensor in a saved model's weight files, read from their headers only."""
    path = Path(model_dir)
    present = [name for name in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX) if (path / name).is_file()]
    if len(present) > 1:  # transformers would read the first and ignore the rest without a word
        newest = max(present, key=lambda name: (path / name).stat().st_mtime)
        raise ModelLoadError(
            f"{path} holds two sets of weights ({' and '.join(present)}; {newest} is the newest): a save in "
            "another layout over an earlier one leaves the old files; remove the stale ones"
        )
    if (path / SAFETENSORS).is_file():
        files = [path / SAFETENSORS]
    elif (path / SAFETENSORS_INDEX).is_file():
        files = _shard_files(path, SAFETENSORS_INDEX)
    elif (path / BIN).is_file() or (path / BIN_INDEX).is_file():
        files = [path / BIN] if (path / BIN).is_file() else _shard_files(path, BIN_INDEX)
        tensors = {}
        for file in files:
            try:  # weights_only: no code from the file runs; meta: no memory for the values
                state = torch.load(file, map_location="meta", weights_only=True)
            except Exception as err:  # torch raises several types for unreadable or unsafe pickles
                raise ModelLoadError(unsafe_pickle(file, err)) from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ModelLoadError(f"{file} does not hold a flat dict of tensors")
            tensors.update({k: stored_tensor(v) for k, v in state.items()})
        return tensors
    else:
        for name in (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX):  # there, but not a file to read
            there = path / name
            if there.is_symlink() and not there.exists():
                raise ModelLoadError(f"{there} is a symlink to a missing target ({os.readlink(there)})")
            if there.exists():
                raise ModelLoadError(f"{there} is not a regular file (a directory, a pipe or a device)")
        raise FileNotFoundError(f"no weights in {path}: expected {SAFETENSORS} (or {SAFETENSORS_INDEX})")
    tensors = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                    stored = f.get_slice(key)
                    dtype = stored.get_dtype()
                    tensors[key] = StoredTensor(tuple(stored.get_shape()), dtype, _safetensors_floating(dtype))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"corrupt or truncated weights file {file}: {err}") from None
    return tensors


def expected_tensors(config: PretrainedConfig) -> tuple[dict[str, torch.Tensor], list[set[str]]]:
    """What ``config`` builds: name -> tensor on the meta device (shape and dtype, no values), and the groups
    of names that share one tensor (tied weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return dict(model.state_dict()), [g for g in groups.values() if len(g) > 1]


def wrong_kinds(found: Mapping[str, StoredTensor], expected: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Name -> "stored as int8 (...)" for each tensor of both whose values are integers where the model holds
    floating-point ones, or the reverse: loading would cast them into zeros or garbage, not refuse them."""
    return {
        k: f"stored as {found[k].dtype} (the model holds {'floating-point' if want else 'integer'} values there)"
        for k in sorted(set(found) & set(expected))
        if found[k].floating != (want := expected[k].is_floating_point())
    }


def stored_tensor(tensor: torch.Tensor) -> StoredTensor:
    """What a weight file's header would say of ``tensor``."""
    return StoredTensor(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor.is_floating_point())


def check_weights(model_dir: str | Path, config: PretrainedConfig) -> None:
    """Raise :class:`ModelLoadError` unless the weight files hold exactly the tensors ``config`` builds, each of
    its shape and, floating-point or not, of its kind."""
    found = checkpoint_tensors(model_dir)
    expected, tied = expected_tensors(config)
    missing = set(expected) - set(found)
    for group in tied:  # a tied tensor is saved once, under any one of its names
        if group & set(found):
            missing -= group
    unexpected = set(found) - set(expected)
    common = sorted(set(found) & set(expected))
    mismatched = [
        f"{k} {found[k].shape} (config.json gives {tuple(expected[k].shape)})"
        for k in common
        if found[k].shape != tuple(expected[k].shape)
    ]
    kinds = [f"{k} {why}" for k, why in wrong_kinds(found, expected).items()]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if mismatched:
        problems.append(f"tensors of another shape: {_names(mismatched)}")
    if kinds:
        problems.append(f"tensors of another kind: {_names(kinds)}")
    if problems:
        raise ModelLoadError(
            f"{model_dir} does not hold the model its config.json describes ({config.model_type}): "
            + "; ".join(problems)
        )


def load_causal_lm(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: PretrainedConfig | None = None,
) -> PreTrainedModel:
    """The causal LM saved in ``model_dir``, checked strictly first (see the module docstring), in eval mode."""
    config = config if config is not None else read_config(model_dir)
    check_weights(model_dir, config)
    _check_generation_config(Path(model_dir), config.vocab_size)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checks above replace transformers' load report
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype)
    except (SafetensorError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load the weights in {model_dir}: {err}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if device is not None:
        model = model.to(device)
    return model.eval()


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or infinity, or None."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def raise_nonfinite(model: torch.nn.Module, what: str, inputs: torch.Tensor | None = None) -> None:
    """Raise :class:`NonFiniteError` for non-finite ``what`` (e.g. "the logits at step 3"), blaming the first
    non-finite parameter, else a non-finite input, else the arithmetic (an overflow in a low precision)."""
    name = first_nonfinite_parameter(model)
    if name is not None:
        raise NonFiniteError(f"{what} are not finite: the model's parameter {name} holds NaN or inf values")
    if inputs is not None and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise NonFiniteError(f"{what} are not finite: the input holds NaN or inf values")
    dtype = next(model.parameters()).dtype
    hint = "; try --dtype float32" if dtype != torch.float32 else ""
    raise NonFiniteError(
        f"{what} are not finite, though every parameter is: the computation overflowed in {dtype}{hint}"
    )


__all__ = [
    "MODEL_TYPES",
    "StoredTensor",
    "check_weights",
    "checkpoint_tensors",
    "expected_tensors",
    "first_nonfinite_parameter",
    "load_causal_lm",
    "load_tokenizer_dir",
    "raise_nonfinite",
    "read_config",
    "stored_tensor",
    "wrong_kinds",
]
