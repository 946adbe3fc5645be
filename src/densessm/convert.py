"""Import checkpoints of the public DenseRetNet code (``modeling_dense_gau_retnet.py``) into our layout.

A reference directory holds a LLaMA-style ``config.json`` (``model_type: llama`` plus ``query_key_dim``,
``v_factor``, ``dense_block_layers``, …) and weights as ``model.safetensors``, ``pytorch_model.bin`` or
their sharded ``*.index.json`` forms. ``.bin`` files are read with ``torch.load(weights_only=True)``:
never a full unpickle.

The reference allocates k/v gates and k/v norms in layer 0 that it never uses; they are dropped with a
notice. Any other missing, unexpected or mis-shaped tensor is an error that names it.

Only regular files inside the source directory are read (a shard named ``../x`` or ``/etc/x`` in an index,
or a symlink leading out, is refused with its name), and the destination is written as a whole through a
temporary sibling: it is refused if it holds anything (unless ``overwrite``), or if it is, contains or lies
inside the source.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from densessm.files import atomic_output_dir, check_destination, check_separate, confined_file
from densessm.loading import first_nonfinite_parameter, json_object, stored_tensor, unsafe_pickle, wrong_kinds
from densessm.models import MODEL_TYPES
from densessm.models.retnet import DenseRetNetConfig, DenseRetNetForCausalLM
from densessm.ops.retention import head_log_decays, rotation_angles

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# reference name (inside model.layers.N.self_attn.) -> ours (inside model.layers.N.retention.)
_BLOCK_NAMES = {
    "q_proj.weight": "q_proj.weight",
    "k_proj.weight": "k_proj.weight",
    "to_hidden.0.weight": "vg_proj.weight",
    "to_out.0.weight": "o_proj.weight",
    "group_norm.weight": "head_norm.weight",
    "k_select.fc1.weight": "dense.k_gate.fc1.weight",
    "k_select.fc2.weight": "dense.k_gate.fc2.weight",
    "v_select.fc1.weight": "dense.v_gate.fc1.weight",
    "v_select.fc2.weight": "dense.v_gate.fc2.weight",
    "k_norm.weight": "dense.k_norm.weight",
    "v_norm.weight": "dense.v_norm.weight",
}
_DENSE_REF_NAMES = {name for name, ours in _BLOCK_NAMES.items() if ours.startswith("dense.")}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|input_layernorm)\.?(.*)$")
_REQUIRED_FIELDS = ("hidden_size", "query_key_dim", "num_attention_heads", "num_hidden_layers", "vocab_size")


class CheckpointError(ValueError):
    """A reference checkpoint that cannot be converted faithfully; the message says why."""


def _read_json(path: Path) -> dict:
    return json_object(path, CheckpointError)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {err}") from err


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable or unsafe pickles
        raise CheckpointError(unsafe_pickle(path, err)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


_LAYOUTS = (
    ("model.safetensors", _load_safetensors),
    ("model.safetensors.index.json", _load_safetensors),
    ("pytorch_model.bin", _load_bin),
    ("pytorch_model.bin.index.json", _load_bin),
)


def _load_layout(src: Path, name: str, loader) -> dict[str, torch.Tensor]:
    path = confined_file(src, name)
    if not name.endswith(".index.json"):
        return loader(path)
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path} has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        try:
            state.update(loader(confined_file(src, shard)))
        except FileNotFoundError:
            raise CheckpointError(f"shard {shard} listed in {path} is missing") from None
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"tensors listed in {path} but absent from its shards: {', '.join(missing)}")
    return state


def load_reference_weights(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a reference directory, whichever of the four weight layouts it uses.

    Published checkpoints often hold the same weights twice (``model.safetensors`` beside ``pytorch_model.bin``):
    every set present is read and they must be equal, so a stale set beside a newer one is named, not silently
    passed over (this reads the weights once per set)."""
    src = Path(src)
    present = [(name, loader) for name, loader in _LAYOUTS if (src / name).exists() or (src / name).is_symlink()]
    if not present:
        raise CheckpointError(
            f"no weights in {src}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json"
        )
    (first, loader), others = present[0], present[1:]
    state = _load_layout(src, first, loader)
    for name, other_loader in others:
        other = _load_layout(src, name, other_loader)
        differing = sorted(set(state) ^ set(other)) or [
            key for key in state if state[key].shape != other[key].shape or not torch.equal(state[key], other[key])
        ]
        if differing:
            raise CheckpointError(
                f"{src} holds two sets of weights that differ ({first} and {name}: {differing[0]} first): remove "
                "the stale one"
            )
        logger.info(f"{src}: {first} and {name} hold the same weights; converting {first}")
    return state


def _layers_in(state: dict[str, torch.Tensor]) -> int:
    """How many layers the weights hold (one more than the highest layer index)."""
    indices = [int(match[1]) for name in state if (match := _LAYER.match(name))]
    return max(indices) + 1 if indices else 0


def _gate_reduction(state: dict[str, torch.Tensor], which: str, hidden: int, layers: int) -> int:
    """The bottleneck ratio of the k or v gate, read off the first dense layer's fc1."""
    for layer in range(1, layers):
        weight = state.get(f"model.layers.{layer}.self_attn.{which}_select.fc1.weight")
        if weight is not None:
            width = weight.shape[0]
            if width < 1 or width > hidden:
                raise CheckpointError(
                    f"{which}_select.fc1 has width {width}, which no gate of hidden_size {hidden} has"
                )
            ratio = hidden // width
            if hidden // ratio != width:
                raise CheckpointError(
                    f"{which}_select.fc1 has width {width}, which no integer ratio of hidden_size {hidden} gives"
                )
            return ratio
    raise CheckpointError(f"no {which}_select.fc1.weight found in layers 1..{layers - 1} of a dense checkpoint")


def reference_config(src: str | Path, state: dict[str, torch.Tensor]) -> DenseRetNetConfig:
    """Our configuration for a reference directory (gate widths are read from the weights)."""
    try:
        path = confined_file(src, "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in reference directory {src}") from None
    ref = _read_json(path)
    if ref.get("model_type") in MODEL_TYPES:
        raise CheckpointError(
            f"{src} already holds a densessm model ({ref['model_type']}): it loads as it is; convert reads only "
            "the public reference's checkpoints (model_type llama)"
        )
    absent = [name for name in (*_REQUIRED_FIELDS, "v_factor", "dense_block_layers") if name not in ref]
    if absent:
        raise CheckpointError(f"{path} is not a DenseRetNet reference config: missing {', '.join(absent)}")
    for name in (*_REQUIRED_FIELDS, "dense_block_layers"):
        value = ref[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "dense_block_layers" else 1):
            kind = "an integer >= 0" if name == "dense_block_layers" else "a positive integer"
            raise CheckpointError(f"{path}: {name} must be {kind}, got {value!r}")
    held = _layers_in(state)
    if held != ref["num_hidden_layers"]:
        raise CheckpointError(
            f"{path} says num_hidden_layers = {ref['num_hidden_layers']} but the weights hold {held} layers"
        )
    m = ref["dense_block_layers"]
    if m == 0:
        raise CheckpointError(
            "reference checkpoints with dense_block_layers=0 still RMS-normalise k and v in layers >= 1, "
            "which densessm's plain RetNet (m=0) does not: converting would change the model"
        )
    tied = ref.get("tie_word_embeddings", False)  # LlamaConfig's default
    if not isinstance(tied, bool):
        raise CheckpointError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")
    hidden, layers = ref["hidden_size"], ref["num_hidden_layers"]
    fields = {
        name: ref[name]
        for name in (
            *_REQUIRED_FIELDS,
            "v_factor",
            "dense_block_layers",
            "rms_norm_eps",
            "dropout",
            "max_position_embeddings",
            "initializer_range",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
        if name in ref
    }
    try:
        return DenseRetNetConfig(
            **fields,
            k_gate_reduction=_gate_reduction(state, "k", hidden, layers),
            v_gate_reduction=_gate_reduction(state, "v", hidden, layers),
            tie_word_embeddings=tied,
            architectures=["DenseRetNetForCausalLM"],
        )
    except CheckpointError:
        raise
    except Exception as err:  # the config's validators raise ValueError, TypeError or a strict-dataclass error
        raise CheckpointError(f"{path} is not a valid DenseRetNet configuration: {err.__cause__ or err}") from None


def _check_constant(name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    """The reference's fixed decays and angles, as saved: in its dtype (a checkpoint saved in half precision
    holds them rounded), while a changed constant differs by far more than a rounding."""
    rtol = max(1e-4, 4 * torch.finfo(tensor.dtype).eps) if tensor.is_floating_point() else 1e-4
    if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=rtol, atol=1e-6):
        raise CheckpointError(f"{name} differs from the standard RetNet constants; this model cannot reproduce it")


def map_reference_state(
    state: dict[str, torch.Tensor], config: DenseRetNetConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename reference tensors to ours; returns ``(our_state, dropped_names)``. Raises on anything else."""
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our name -> the reference's, to name a tensor as the user's files do
    dropped: list[str] = []
    unexpected: list[str] = []
    heads = config.num_attention_heads
    for name, tensor in state.items():
        if name == "model.retnet_rel_pos.decay":
            _check_constant(name, tensor, head_log_decays(heads))
            dropped.append(name)
            continue
        if name == "model.retnet_rel_pos.angle":
            _check_constant(name, tensor, rotation_angles(config.query_key_dim // heads))
            dropped.append(name)
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            ours[name], source[name] = tensor, name
            continue
        match = _LAYER.match(name)
        if match is None:
            unexpected.append(name)
            continue
        layer, part, rest = int(match[1]), match[2], match[3]
        if part == "input_layernorm":
            ours[name], source[name] = tensor, name
        elif rest in _DENSE_REF_NAMES and layer == 0:
            dropped.append(name)  # allocated but never used by the reference
        elif rest in _BLOCK_NAMES:
            mapped = f"model.layers.{layer}.retention.{_BLOCK_NAMES[rest]}"
            ours[mapped], source[mapped] = tensor, name
        else:
            unexpected.append(name)

    if config.tie_word_embeddings and "model.embed_tokens.weight" in ours:
        # the reference ties its head to the embeddings at load: a stored lm_head is not what it computes with
        if "lm_head.weight" in ours:
            dropped.append("lm_head.weight")
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]
        source["lm_head.weight"] = "model.embed_tokens.weight"
    with torch.device("meta"):
        expected = DenseRetNetForCausalLM(config).state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected += sorted(set(ours) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    for name in sorted(set(ours) & set(expected)):
        if ours[name].shape != expected[name].shape:
            problems.append(f"{name} has shape {tuple(ours[name].shape)}, expected {tuple(expected[name].shape)}")
    kinds = wrong_kinds({name: stored_tensor(tensor) for name, tensor in ours.items()}, expected)
    problems += [f"{source[name]} {why}" for name, why in kinds.items()]
    if problems:
        raise CheckpointError("the reference weights do not match their config.json: " + "; ".join(problems))
    return ours, dropped


def _reference_dir(src: str | Path) -> Path:
    """``src`` as a Path, refused unless it is a directory (a file given as SRC is named as a file)."""
    src = Path(src)
    if not src.exists() and src.is_symlink():  # a loop, or a link to a missing target
        raise CheckpointError(f"reference directory {src} is a symlink that leads nowhere (to {os.readlink(src)})")
    if not src.exists():
        raise CheckpointError(f"reference directory {src} does not exist")
    if not src.is_dir():
        what = "a file" if src.is_file() else "a pipe, socket or device"
        raise CheckpointError(f"{src} is {what}, not a reference directory: name the directory that holds it")
    return src


def load_reference_model(src: str | Path, dtype: torch.dtype | None = None) -> DenseRetNetForCausalLM:
    """A DenseRetNetForCausalLM holding a reference checkpoint's weights (in their dtype unless given)."""
    src = _reference_dir(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"no config.json in reference directory {src}")
    state = load_reference_weights(src)
    config = reference_config(src, state)
    ours, dropped = map_reference_state(state, config)
    if dropped:
        logger.warning("dropped %d unused reference tensors: %s", len(dropped), ", ".join(dropped))
    with torch.device("meta"):
        model = DenseRetNetForCausalLM(config)
    model.load_state_dict(ours, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
        for name, tensor in model.state_dict().items():  # a value beyond the dtype's range becomes inf
            if (
                tensor.is_floating_point()
                and not bool(torch.isfinite(tensor).all())
                and bool(torch.isfinite(ours[name]).all())
            ):
                raise CheckpointError(f"{name} holds values beyond the range of {dtype}: convert without --dtype")
    return model.eval()


def convert_reference_checkpoint(
    src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write ``src`` (reference layout) to ``dst`` as a densessm directory ``from_pretrained`` can load.

    ``dst`` must be empty or absent (or ``overwrite``) and apart from ``src``; it appears complete or not at all."""
    src, dst = _reference_dir(src), Path(dst)
    check_separate(src, dst)
    check_destination(dst, overwrite)
    model = load_reference_model(src, dtype=dtype)
    damaged = first_nonfinite_parameter(model)
    if damaged is not None:  # generate and eval would stop at it; a converted copy would only move the problem
        raise CheckpointError(f"{src}: the weights of {damaged} hold NaN or inf values: nothing was written")
    present = [name for name in TOKENIZER_FILES if (src / name).exists() or (src / name).is_symlink()]
    tokenizer_files = {name: confined_file(src, name) for name in present}
    with atomic_output_dir(dst, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, staging / name)
    return dst
