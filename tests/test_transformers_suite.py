"""transformers' own common tests, run on every family as they run on an in-tree model.

The installed transformers version's source distribution ships ``tests/test_modeling_common.py``,
``test_configuration_common.py`` and ``test_training_mixin.py``. They are fetched from the package index with
pip at collection (once: cached under the user cache directory, so later runs are offline), and their mixins
run here unchanged on a tiny configuration of every family in ``densessm.models.FAMILIES``: the base model,
the causal LM and the sequence classifier. Where the distribution cannot be had (no network on a first run),
the module is skipped with the reason.

Adapted only as an in-tree model adapts them, mirroring transformers' own Mamba tests: ``has_attentions =
False`` (a recurrent model has no attention weights; the attention-output tests skip themselves). Nothing is
skipped by hand. The suite also decides what a class is by its name in transformers' name tables (which
classes get labels, which is the base model); an in-tree model is listed there, ours are registered with the
Auto classes instead, so the suite's view of those tables lists them too. Without that, the problem-type,
mismatched-shape, default-config, ``inputs_embeds``-versus-``input_ids`` and base-model-prefix tests passed
without checking anything, and the training tests failed for want of labels. (The overfit test's final
generation runs without a cache, as it does for every model but RecurrentGemma; generation through the
recurrent state is what ``tests/test_hf_generation.py`` tests.)

The distribution leaves out three helper modules those files import; they are stood in for here:

- ``generation/test_utils.py`` (``GenerationTesterMixin``): an empty class, so
  ``test_generation_tester_mixin_inheritance`` is skipped with that reason. Generation conformance is
  tested in ``tests/test_hf_generation.py``.
- ``exporters/test_export.py`` (``ExportTesterMixin``): an empty class. ``torch.export`` is tested in
  ``tests/test_export.py``.
- ``utils/test_configuration_utils.py``: ``config_common_kwargs``, the common ``PreTrainedConfig`` arguments
  set away from their defaults (what ``ConfigTester.check_config_arguments_init`` checks a config keeps).

Tests that would pass vacuously are skipped with the reason (:func:`not_applicable`): the
``test_get_{text,image,audio,video}_features_*`` tests (for multimodal models; they return at once) and
``test_save_load_keys_to_ignore_on_save`` (no keys to ignore).
``test_pipeline_mixin.py`` cannot be imported outside transformers' repository (it opens the repository's
tiny-model summary at import) and tests only architectures published as tiny models on the Hub;
``tests/test_hf_pipelines.py`` runs the pipelines on every family instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import warnings
from importlib import import_module
from pathlib import Path

import pytest
import torch
import transformers

from densessm.files import DestinationExistsError, atomic_output_dir
from densessm.models import FAMILIES

SUITE_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")
PACKAGE = "transformers_sdist_tests"


def cache_dir() -> Path:
    """Where the fetched tests live: under the user cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "densessm" / f"transformers-{transformers.__version__}-tests"


def fetch_suite(destination: Path) -> None:
    """Download the installed version's sdist with pip and keep only its top-level test files."""
    with tempfile.TemporaryDirectory(prefix="densessm-sdist-") as download:
        # the sdist of transformers only: the tools pip builds its metadata with may come as wheels
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "transformers", "--quiet"]
        command += ["--retries", "1", "--timeout", "20", "-d", download, f"transformers=={transformers.__version__}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
            raise OSError(f"pip download failed: {last}")
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if len(archives) != 1:
            raise OSError(f"pip download gave {[a.name for a in Path(download).iterdir()]}, not one .tar.gz sdist")
        prefix = f"transformers-{transformers.__version__}/tests/"
        # an incomplete folder (a layout of an older version of this file) is replaced, atomically
        output = atomic_output_dir(destination, overwrite=destination.exists(), what="the transformers test cache")
        with tarfile.open(archives[0]) as tar, output as tmp:
            members = [m for m in tar.getmembers() if m.name in {prefix + name for name in SUITE_FILES}]
            if len(members) != len(SUITE_FILES):
                raise OSError(f"the transformers {transformers.__version__} sdist lacks some of {SUITE_FILES}")
            for member in members:
                member.name = Path(member.name).name
                tar.extract(member, tmp, filter="data")
            (tmp / "__init__.py").touch()  # the package the files import each other through (not in the sdist)


def load_suite() -> types.ModuleType | str:
    """The package of fetched tests (with the stand-ins for the modules the sdist omits), or why not."""
    folder = cache_dir()
    if not all((folder / name).is_file() for name in (*SUITE_FILES, "__init__.py")):
        try:
            fetch_suite(folder)
        except DestinationExistsError:
            pass  # another process fetched it meanwhile
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            return f"transformers {transformers.__version__}'s test files could not be fetched into {folder}: {err}"
    try:
        import parameterized  # noqa: F401  (test_modeling_common imports it)
    except ImportError:
        return "transformers' common tests need the `parameterized` package (pip install parameterized)"
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    stand_ins = {
        "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        "utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
    }
    for dotted, names in stand_ins.items():
        parent = f"{PACKAGE}.{dotted.split('.')[0]}"
        sys.modules.setdefault(parent, types.ModuleType(parent)).__path__ = []
        module = types.ModuleType(f"{PACKAGE}.{dotted}")
        module.__dict__.update(names)
        sys.modules[module.__name__] = module
    return package


CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["DenseSSMModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}

SUITE = load_suite()
if isinstance(SUITE, str):
    pytest.skip(SUITE, allow_module_level=True)

with warnings.catch_warnings():  # their marks (flash_attn_test, ...) are registered in transformers' own conftest
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    common = import_module(f"{PACKAGE}.test_modeling_common")
    configuration = import_module(f"{PACKAGE}.test_configuration_common")
    training = import_module(f"{PACKAGE}.test_training_mixin")
GenerationTesterMixin = sys.modules[f"{PACKAGE}.generation.test_utils"].GenerationTesterMixin

# The suite decides what a class is (a base model, a causal LM, a classifier: which labels it gets, which
# checks apply) by its name in transformers' own name tables. An in-tree model is listed there; ours are
# registered with the Auto classes instead, so the suite's view of those tables lists them too (copies: the
# tables the Auto classes read stay as they are).
for _table, _head in (
    ("MODEL_MAPPING_NAMES", "model"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal_lm"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
):
    _ours = {family.config.model_type: getattr(family, _head).__name__ for family in FAMILIES}
    setattr(common, _table, type(getattr(common, _table))({**getattr(common, _table), **_ours}))
del _table, _head, _ours

TINY = {
    "retnet": dict(
        hidden_size=32,
        query_key_dim=16,
        num_attention_heads=2,
        v_factor=2,
        k_gate_reduction=4,
        v_gate_reduction=4,
        max_position_embeddings=64,
    ),
    # hidden 32 as transformers' Mamba tester: at 16 the overfit test's gradient norm falls 81%, short of its 90%
    "mamba": dict(hidden_size=32, state_size=4, dense_gate_reduction=4, chunk_size=4),
    "mamba2": dict(
        hidden_size=16, num_heads=8, head_dim=4, state_size=4, n_groups=2, dense_gate_reduction=4, chunk_size=4
    ),
}


class FamilyTester:
    """The ``model_tester`` the mixins ask for: a tiny config of one family and random inputs."""

    def __init__(self, parent: unittest.TestCase, family, batch_size: int = 3, seq_length: int = 7):
        self.parent, self.family = parent, family
        self.batch_size, self.seq_length = batch_size, seq_length
        self.vocab_size, self.num_hidden_layers, self.num_labels = 99, 2, 3
        self.is_training = True
        self.causal_lm_class = family.causal_lm
        self.base_model_class = family.model
        self.sequence_classification_class = family.sequence_classification
        self.hidden_size = TINY[family.name]["hidden_size"]
        self.num_attention_heads = TINY[family.name].get("num_attention_heads", 1)

    def get_config(self):
        return self.family.config(
            vocab_size=self.vocab_size,
            num_hidden_layers=self.num_hidden_layers,
            dense_block_layers=1,
            num_labels=self.num_labels,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **TINY[self.family.name],
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # left padding, as generation takes it (a row ending in padding is refused); transformers' random mask may
        # end a row in padding
        starts = torch.randint(0, self.seq_length, (self.batch_size, 1))
        attention_mask = (torch.arange(self.seq_length) >= starts).long().to(input_ids.device)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


def family_test_case(family) -> type:
    class Case(common.ModelTesterMixin, GenerationTesterMixin, training.TrainingTesterMixin, unittest.TestCase):
        all_model_classes = (family.model, family.causal_lm, family.sequence_classification)
        has_attentions = False  # as transformers' Mamba: a recurrent model has no attention weights
        model_tester = None

        def setUp(self):
            self.model_tester = FamilyTester(self, family)
            self.config_tester = configuration.ConfigTester(
                self,
                config_class=family.config,
                common_properties=["hidden_size", "num_hidden_layers"],
                **TINY[family.name],
            )

        def test_config(self):
            self.config_tester.run_common_tests()

    for name, reason in not_applicable().items():
        setattr(Case, name, unittest.skip(reason)(lambda self, *args, **kwargs: None))
    Case.__name__ = Case.__qualname__ = f"Test{family.title.replace('-', '')}Common"
    return Case


def not_applicable() -> dict[str, str]:
    """The suite's tests that would pass without checking anything on our models, skipped with the reason
    instead: a pass must mean something."""
    skips = {
        name: "for multimodal models (text, image, audio or video feature getters): it returns at once on a text model"
        for name in dir(common.ModelTesterMixin)
        if name.startswith("test_get_") and "_features_" in name
    }
    skips["test_save_load_keys_to_ignore_on_save"] = "the models have no keys to ignore on save: it returns at once"
    skips["test_generation_tester_mixin_inheritance"] = (
        "GenerationTesterMixin is not in the source distribution (stood in for by an empty class); generation "
        "conformance is tests/test_hf_generation.py"
    )
    return skips


for _family in FAMILIES:
    _case = family_test_case(_family)
    globals()[_case.__name__] = _case
del _family, _case


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_the_suite_treats_our_classes_as_an_in_tree_model_s(family):
    """The name tables above hold: the heads get labels and the base model is known as one. Else the training
    tests fail for want of a loss, and the classifier, base-model and ``inputs_embeds`` tests skip every class
    and pass without checking anything."""
    case = globals()[f"Test{family.title.replace('-', '')}Common"](methodName="test_config")
    case.setUp()
    _, inputs = case.model_tester.prepare_config_and_inputs_for_common()
    for head in (family.causal_lm, family.sequence_classification):
        assert "labels" in case._prepare_for_class(inputs, head, return_labels=True)
    assert "labels" not in case._prepare_for_class(inputs, family.model, return_labels=True)
    assert common.MODEL_MAPPING_NAMES[family.config.model_type] == family.model.__name__
