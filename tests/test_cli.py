"""``ia3-jax finetune`` end to end on a tiny BERT, and its bad-input errors (raised before anything is written)."""

from __future__ import annotations

import json
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


@pytest.fixture
def csv_data(tmp_path) -> Path:
    path = tmp_path / "words.csv"
    rows = [f"{w},{label}" for label, words in WORDS.items() for w in words]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _options(tmp_path: Path, model_dir: Path, data: Path, **changes) -> cli.FinetuneOptions:
    settings = {"steps": 4, "batch_size": 8, "lr": 3e-2, "out": tmp_path / "out"} | changes
    return cli.FinetuneOptions(model_dir=model_dir, data=data, **settings)


def test_finetune_end_to_end_and_peft_reads_the_adapter(tmp_path, torch_model_dir, csv_data, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    monkeypatch.chdir(tmp_path)  # --out relative to the working directory, as the default is
    metrics = cli.finetune(_options(tmp_path, torch_model_dir, csv_data, out=Path("out")))
    out = tmp_path / "out"
    written = ("training_curves.png", "metrics.json", "adapter_peft/adapter_config.json", "adapter_peft/adapter_model.safetensors")
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
def test_bad_csv_fails_before_anything_is_written(tmp_path, content, message):
    data = tmp_path / "words.csv"
    data.write_text(content)
    options = _options(tmp_path, tmp_path / "model_never_read", data)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.finetune(options)
    assert not options.out.exists()


def test_bad_jsonl_and_missing_files(tmp_path):
    model_dir = tmp_path / "model_never_read"
    bad = tmp_path / "words.jsonl"
    bad.write_text('{"text": "happy", "label": 1}\n{"text": "sad", "label": null}\n')
    with pytest.raises(DataError, match=r"words.jsonl:2: empty label"):
        cli.finetune(_options(tmp_path, model_dir, bad))
    bad.write_text('{"text": "happy", "label": 1}\n["sad", 0]\n')
    with pytest.raises(DataError, match=r"words.jsonl:2: expected a JSON object"):
        cli.finetune(_options(tmp_path, model_dir, bad))
    with pytest.raises(DataError, match="does not exist"):
        cli.finetune(_options(tmp_path, model_dir, tmp_path / "nope.csv"))
    other = tmp_path / "words.parquet"
    other.write_text("x")
    with pytest.raises(DataError, match="unknown file type '.parquet'"):
        cli.finetune(_options(tmp_path, model_dir, other))


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


def test_console_entry_point_reports_bad_input(tmp_path):
    data = tmp_path / "words.csv"
    data.write_text("words,label\nhappy,1\n")
    result = subprocess.run(
        [sys.executable, "-m", "ia3_jax", "finetune", "--data", str(data), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "ia3-jax finetune: " in result.stderr and "no column ['text']" in result.stderr
    assert not (tmp_path / "out").exists()


def test_parse_args_defaults_and_options():
    assert cli.parse_args(["finetune"]) == cli.FinetuneOptions()
    options = cli.parse_args(["finetune", "--steps", "7", "--lr", "0.1", "--data", "d.jsonl", "--text-column", "t"])
    assert (options.steps, options.lr, options.data, options.text_column) == (7, 0.1, Path("d.jsonl"), "t")
    with pytest.raises(SystemExit):
        cli.parse_args(["finetune", "--steps", "0"])


def test_vader_lexicon_polarity_and_fixed_split():
    data = vader_lexicon()
    assert len(data) == 6817 and np.bincount(data.labels).tolist() == [3817, 3000]
    rating = dict(zip(data.texts, data.labels))
    assert rating["good"] == 1 and rating["bad"] == 0 and rating[":)"] == 1
    assert "grrr" not in rating  # mean -0.4: no clear polarity, dropped
    train, heldout = heldout_split(data)
    assert (len(train), len(heldout)) == (5407, 1410)
    assert not set(train.texts) & set(heldout.texts)
