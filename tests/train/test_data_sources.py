"""`data.sources`: datasets made here (parquet, CSV, JSON, save_to_disk, a Hub cache), mapped, checked, mixed."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import datasets
import pytest
import yaml

from lorabox.env.recipe import RecipeError, load_recipe
from lorabox.env.recipe_data import DataSource
from lorabox.train import tiny_model
from lorabox.train.data import DataError
from lorabox.train.sources import chat_template, load_source, load_sources, use_chat_template
from tests.train.conftest import REPO

QA = [{"question": f"What is {n} plus {n}?", "answer": f"{n} plus {n} is {2 * n}.", "id": n} for n in range(10)]
CHATS = [
    {"conversations": [{"from": "human", "value": f"Say {n}."}, {"from": "gpt", "value": f"{n}."}]} for n in range(6)
]
QA_COLUMNS = {"instruction": "question", "output": "answer"}
# No {% generation %} markers, unlike the bundled model's own template: training says which one it used.
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>\n{% endfor %}"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Arrow files `datasets` builds from parquet/CSV/JSON go under this test's directory, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def write_sources(directory: Path) -> dict[str, Path]:
    """The same question/answer rows as parquet, CSV and JSON, and ShareGPT chats saved with save_to_disk."""
    table = datasets.Dataset.from_list(QA)
    paths = {kind: directory / f"qa.{kind}" for kind in ("parquet", "csv", "json")}
    table.to_parquet(str(paths["parquet"]))
    table.to_csv(str(paths["csv"]), index=False)
    table.to_json(str(paths["json"]))
    splits = {"train": datasets.Dataset.from_list(CHATS), "test": datasets.Dataset.from_list(CHATS[:2])}
    datasets.DatasetDict(splits).save_to_disk(str(directory / "chats"))
    return paths | {"disk": directory / "chats"}


def recipe_with(directory: Path, data: dict, seed: int = 42):
    path = directory / f"recipe-{seed}.yaml"
    body = {"model": {"name_or_path": "bundled:tiny-llama"}, "data": data, "training": {"seed": seed}}
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return load_recipe(path)


@pytest.mark.parametrize("kind", ["parquet", "csv", "json"])
def test_a_file_is_mapped_to_the_instruction_shape(tmp_path, kind):
    path = write_sources(tmp_path)[kind]
    data = load_source(DataSource(path=path, columns=QA_COLUMNS), "data.sources[0]", "auto")
    assert data.shape == "instruction" and len(data.rows) == 10
    assert data.rows[3] == {"instruction": "What is 3 plus 3?", "output": "3 plus 3 is 6."}


def test_sharegpt_on_disk_is_recognised_and_its_split_chosen(tmp_path):
    disk = write_sources(tmp_path)["disk"]
    data = load_source(DataSource(path=disk, split="test"), "data.sources[0]", "auto")
    assert data.shape == "chat" and len(data.rows) == 2
    assert data.rows[1]["messages"] == [{"role": "user", "content": "Say 1."}, {"role": "assistant", "content": "1."}]
    with pytest.raises(DataError, match=r"chats has no split 'dev'; its splits: train, test"):
        load_source(DataSource(path=disk, split="dev"), "data.sources[0]", "auto")


def test_jsonl_source_keeps_file_and_line(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello."}, {"q": "Bye?", "a": 7}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'output' is int, expected a string"):
        load_source(DataSource(path=path, columns={"instruction": "q", "output": "a"}), "data.sources[0]", "auto")


def test_sources_evaluate_on_an_eval_file(tmp_path, write_jsonl):
    write_sources(tmp_path)
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "What is 1 plus 1?", "output": "2."}])
    data = {"sources": [{"path": "chats"}], "eval_file": "eval.jsonl"}
    train, evaluation, _ = load_sources(recipe_with(tmp_path, data).data, seed=0)
    assert len(train.rows) == 6 and str(evaluation.path) == "data.eval_file"  # nothing held out of the sources
    assert evaluation.rows[0]["messages"][1] == {"role": "assistant", "content": "2."}  # joins the chat shape


def test_bad_rows_are_located_by_dataset_split_and_row(tmp_path):
    rows = [*CHATS[:2], {"conversations": [{"from": "tool", "value": "{}"}, {"from": "gpt", "value": "ok"}]}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[train\]#2: messages\[0\] has role 'tool', expected one of system"):
        load_source(DataSource(path=tmp_path / "bad"), "data.sources[0]", "auto")
    datasets.Dataset.from_list([*QA[:3], {"question": "Q?", "answer": None}]).to_parquet(str(tmp_path / "gap.parquet"))
    with pytest.raises(DataError, match=r"gap\.parquet\[train\]#3: missing field 'output'"):
        load_source(DataSource(path=tmp_path / "gap.parquet", columns=QA_COLUMNS), "data.sources[0]", "auto")


def test_a_wrong_column_names_source_columns_and_guess(tmp_path):
    path = write_sources(tmp_path)["csv"]
    with pytest.raises(DataError) as caught:
        load_source(
            DataSource(path=path, columns={"instruction": "question", "output": "answr"}), "data.sources[1]", "auto"
        )
    message = str(caught.value)
    assert "data.sources[1]" in message and "qa.csv[train]" in message
    assert (
        "column 'answr' (for output) not found; did you mean 'answer'? (its columns: question, answer, id)" in message
    )
    with pytest.raises(DataError, match=r"columns question, answer, id match no data shape; map them"):
        load_source(DataSource(path=path), "data.sources[0]", "auto")


def test_mixing_follows_weights_and_seed(tmp_path):
    paths = write_sources(tmp_path)
    data = {
        "sources": [
            {"path": str(paths["parquet"]), "columns": QA_COLUMNS, "weight": 3},
            {"path": str(paths["disk"]), "weight": 1},
        ],
        "eval_fraction": 0.2,
    }
    train, evaluation, report = load_sources(recipe_with(tmp_path, data).data, seed=1)
    # 8 + 4 rows left after holding out 2 + 2; each instruction row joins the chats as one user/assistant exchange
    assert train.shape == "chat" and len(train.rows) == 12 and len(evaluation.rows) == 4
    from_qa = sum("plus" in row["messages"][0]["content"] for row in train.rows)
    assert from_qa == 9, report  # weight 3 of 4 of 12 rows
    held = {json.dumps(row) for row in evaluation.rows}
    assert not held & {json.dumps(row) for row in train.rows}  # a repeated row never lands on both sides
    again, _, _ = load_sources(recipe_with(tmp_path, data).data, seed=1)
    other, _, _ = load_sources(recipe_with(tmp_path, data).data, seed=2)
    assert again.rows == train.rows and again.sha256() == train.sha256()
    assert other.sha256() != train.sha256()


def test_recipe_rules_for_sources(tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    recipe = recipe_with(tmp_path, {"sources": [{"path": "qa.parquet"}], "chat_template": "t.jinja"})
    assert recipe.data.sources[0].path == tmp_path / "qa.parquet"  # relative to the recipe file
    assert recipe.data.chat_template == str(tmp_path / "t.jinja")
    both = {"train_file": "a.jsonl", "sources": [{"path": "a"}]}
    with pytest.raises(
        RecipeError, match=r"data: give exactly one of data.train_file \(a JSONL file\) or data.sources"
    ):
        recipe_with(tmp_path, both)
    with pytest.raises(RecipeError, match=r"data.eval_sources goes with data.sources; with data.train_file use"):
        recipe_with(tmp_path, {"train_file": "a.jsonl", "eval_sources": [{"path": "a"}]})
    with pytest.raises(RecipeError) as caught:
        recipe_with(tmp_path, {"sources": [{"path": "a", "colums": {}}, {"hub": "a/b", "path": "c"}]})
    message = str(caught.value)
    assert "data.sources[0].colums: unknown key; did you mean 'data.sources.columns'?" in message
    assert "data.sources[1]: give exactly one of path (a local dataset or file) or hub" in message
    write_sources(tmp_path)
    with pytest.raises(DataError, match="give every source a weight, or none"):
        load_sources(recipe_with(tmp_path, {"sources": [{"path": "chats", "weight": 2}, {"path": "chats"}]}).data, 0)


def test_every_recipe_example_in_the_data_docs_is_a_valid_recipe(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "data.md").read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 7
    for block in blocks:
        body = {"model": {"name_or_path": "bundled:tiny-llama"}, **yaml.safe_load(block)}
        (tmp_path / "doc.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
        load_recipe(tmp_path / "doc.yaml")


def test_chat_template_override_is_checked_and_applied(tmp_path, model_cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.resolve("bundled:tiny-llama"))
    data = recipe_with(tmp_path, {"train_file": "a.jsonl", "chat_template": TEMPLATE}).data
    assert use_chat_template(tokenizer, data) and tokenizer.chat_template == TEMPLATE
    broken = recipe_with(tmp_path, {"train_file": "a.jsonl", "chat_template": "{% for m in messages %}x"}).data
    with pytest.raises(DataError, match=r"data.chat_template: line 1: .*fix the Jinja template"):
        use_chat_template(tokenizer, broken)
    missing = recipe_with(tmp_path, {"train_file": "a.jsonl", "chat_template": "gone.jinja"}).data
    with pytest.raises(DataError, match=r"gone\.jinja: No such file or directory"):
        chat_template(missing)


def fake_hub_cache(hf_home: Path) -> None:
    """What `hf download --repo-type dataset acme/qa` leaves: a snapshot with a config `short` in its README."""
    repo = hf_home / "hub" / "datasets--acme--qa"
    snapshot = repo / "snapshots" / ("0" * 40)
    (snapshot / "short").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40, encoding="utf-8")
    datasets.Dataset.from_list(QA).to_parquet(str(snapshot / "short" / "train.parquet"))
    card = "---\nconfigs:\n- config_name: short\n  data_files:\n  - split: train\n    path: short/train.parquet\n---\n"
    (snapshot / "README.md").write_text(card, encoding="utf-8")


def train_on_a_cached_and_an_absent_hub_dataset(tmp_path, cli, make_recipe) -> str:
    """`lorabox train` on acme/qa (in a fake Hub cache) and acme/absent: refused with exit 2 for the absent one
    alone, no traceback; its output."""
    fake_hub_cache(tmp_path / "hf")
    sources = [
        {"hub": "acme/qa", "config": "short", "split": "train", "columns": QA_COLUMNS},
        {"hub": "acme/absent", "split": "validation"},
    ]
    recipe = make_recipe(tmp_path, tmp_path / "unused.jsonl", data={"sources": sources})
    done = cli("lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(tmp_path / "run"), timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    assert "data.sources[0]" not in output  # acme/qa:short came from the cache
    return output


def test_offline_hub_reads_the_cache_and_names_what_is_missing(tmp_path, monkeypatch, cli, make_recipe):
    """Through `lorabox train`: the cached Hub dataset loads, the missing one stops the run with exit 2."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = train_on_a_cached_and_an_absent_hub_dataset(tmp_path, cli, make_recipe)
    assert "data.sources[1]: Hub dataset acme/absent (config default, split validation) is not available" in output
    assert "HF_HUB_OFFLINE=1" in output and "`hf download --repo-type dataset acme/absent`" in output, output
    assert "HF_TOKEN" in output


def test_unreachable_hub_uses_the_cache_and_stops_at_once_for_the_rest(tmp_path, monkeypatch, cli, make_recipe):
    """Online but the Hub refuses connections: one quick request finds that out (datasets would retry for about
    half a minute); the cached dataset loads, the other one stops the run with exit 2 naming why."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    output = train_on_a_cached_and_an_absent_hub_dataset(tmp_path, cli, make_recipe)
    expected = (
        "data.sources[1]: Hub dataset acme/absent (config default, split validation) is not available: "
        f"the Hub (http://127.0.0.1:{port}) cannot be reached (ConnectError"
    )
    assert expected in output, output
    assert "`hf download --repo-type dataset acme/absent`" in output and "set HF_HUB_OFFLINE=1" not in output, output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_on_a_weighted_mix_with_its_own_chat_template(tmp_path, monkeypatch, cli, make_recipe):
    """One real run: parquet + save_to_disk mixed by weight, the recipe's chat template used and saved."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_sources(tmp_path)
    (tmp_path / "plain.jinja").write_text(TEMPLATE, encoding="utf-8")
    data = {
        "sources": [
            {"path": "qa.parquet", "columns": QA_COLUMNS, "weight": 0.6},
            {"path": "chats", "layout": "sharegpt", "weight": 0.4},
        ],
        "chat_template": "plain.jinja",
        "max_seq_len": 64,
        "eval_fraction": 0.2,
    }
    training = {"micro_batch_size": 4, "gradient_accumulation": 1, "max_steps": 3, "logging_steps": 1}
    recipe = make_recipe(tmp_path, tmp_path / "unused.jsonl", data=data, training={**training, "save_steps": 3})
    run_dir = tmp_path / "run"
    done = cli("lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for line in (
        f"{tmp_path / 'qa.parquet'}[train]: 10 chat rows",
        f"{tmp_path / 'chats'}[train]: 6 chat rows",
        "held out 4 rows for evaluation",
        "(weight 0.6)",
        "chat template: data.chat_template replaces the model's",
        "loss on the last assistant turn only (the chat template has no {% generation %} markers)",
    ):
        assert line in output, output[-3000:]
    provenance = json.loads((run_dir / "provenance.json").read_text(encoding="utf-8"))
    assert set(provenance["dataset_hashes"]) == {"data.sources", "data.sources (held out)"}
    saved = "".join(p.read_text(encoding="utf-8") for p in (run_dir / "adapter").glob("*.j*"))
    assert "m['role'] }}: {{ m['content'] }}" in saved  # the adapter's tokenizer carries the recipe's template
    (tmp_path / "plain.jinja").write_text(TEMPLATE.replace(": ", " said: "), encoding="utf-8")
    again = cli("lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "data.chat_template (sha256 of content)" in again.stderr  # a changed template is another run
