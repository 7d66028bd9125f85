"""scripts/eval_dllm.py's code workload end to end on a tiny random byte-level dLLM (`pdx eval dllm`)."""

import json
import os

import jax
import pytest

from pdx import cli
from pdx.io import orbax_checkpoint, tokenizer
from pdx.models import transformer
from pdx.train import code_data

FUNCTION = '''def f{i}(x):
    """Return x plus {i}."""
    y = x + {i}
    return y

'''


@pytest.fixture(scope="module")
def code_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("code_eval")
    data = root / "data"
    data.mkdir()
    for name in ("a", "b", "x8"):  # x8.py is in the held-out tenth (by its path hash)
        (data / f"{name}.py").write_text("".join(FUNCTION.format(i=i) for i in range(6)))
    cfg = transformer.Config(vocab_size=code_data.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                             eos_token_ids=(code_data.EOS,), pad_token_id=code_data.EOS, mask_token_id=code_data.MASK)
    path = root / "ckpt" / "bidirectional"
    orbax_checkpoint.save(path, transformer.init_params(cfg, jax.random.PRNGKey(0)), cfg, {})
    tokenizer.save_byte_level(path, (code_data.EOS,), code_data.SPECIALS)
    return root, data


@pytest.mark.slow  # 12 s: the default suite ran 15:27 (budget 15 min)
def test_code_workload_scores_every_setting_against_the_reference(code_setup):
    root, data = code_setup
    held_out = [f for f in ("a.py", "b.py", "x8.py") if code_data.is_held_out(f)]
    assert held_out == ["x8.py"]
    out = root / "eval"
    assert cli.main(["eval", "dllm", "--workloads", "code", "--models", "bidirectional", "--code-ckpt",
                     str(root / "ckpt"), "--code-data", str(data), "--code-n", "2", "--code-gen", "32",
                     "--batch", "2", "--n1", "1", "--out", str(out)]) == 0
    rows = json.loads((out.parent / "eval.json").read_text())["rows"]
    assert [r["setting"] for r in rows][:2] == ["llada 1 tok/step", "threshold 0.9 none"] and len(rows) == 10
    ref = rows[0]
    assert ref["accuracy"] == ref["sequence_agreement"] == 100.0 and ref["nfe_per_token"] >= 1.0
    for r in rows:
        assert 0 <= r["accuracy"] <= 100 and 0 <= r["parses"] <= 100 and r["tokens_per_s_b1"] > 0
        assert r["workload"] == "code" and r["task"] == "code 32" and r["n"] == 2
    assert "| code | bidirectional | llada 1 tok/step | code 32 | 2 | 100.0 | 100.0 |" in (root / "eval.md").read_text()
    assert (root / "eval_code.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--workloads", "poetry"], "unknown workloads"),
    (["--batch", "3", "--code-n", "4"], "must be >= 1 and divide"),
])
def test_bad_eval_options_exit_2(argv, message, capsys):
    assert cli.main(["eval", "dllm", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_code_model_is_reported(code_setup, capsys):
    root, data = code_setup
    assert cli.main(["eval", "dllm", "--workloads", "code", "--models", "block_causal", "--code-ckpt",
                     str(root / "ckpt"), "--code-data", str(data), "--out", str(root / "none")]) == 0
    assert "no block_causal code dLLM at" in capsys.readouterr().err


def test_too_few_prompts_is_an_error(code_setup, capsys):
    root, data = code_setup
    assert cli.main(["eval", "dllm", "--workloads", "code", "--models", "bidirectional", "--code-ckpt",
                     str(root / "ckpt"), "--code-data", str(data), "--code-n", "64", "--code-gen", "32",
                     "--batch", "8", "--out", str(root / "x")]) == 2
    assert "held-out function prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_synthetic_workload_on_a_shipped_tiny_model(tmp_path):
    out = tmp_path / "eval"
    ckpt = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints", "tiny_dllm")
    assert cli.main(["eval", "dllm", "--workloads", "synthetic", "--ckpt", ckpt, "--models", "block_causal",
                     "--tasks", "copy", "--n", "8", "--batch", "8", "--n1", "1", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [r["setting"] for r in rows][0] == "block: llada 1 tok/step" and len(rows) == 4
    assert all(r["workload"] == "synthetic" and r["accuracy"] == 100.0 for r in rows)  # copy is learned
    assert (tmp_path / "eval.png").stat().st_size > 0


@pytest.mark.slow  # 25 s: the default suite ran 16 min (budget 15)
def test_long_workload_and_ar_baseline_end_to_end(tmp_path):
    """agree-256 on a random bidirectional dLLM (four settings) and a random AR model, one table and plot."""
    from pdx.train import tasks

    ckpt = tmp_path / "tiny"
    for attention, diffusion in (("bidirectional", True), (None, False)):
        cfg = tasks.model_config(hidden=32, layers=1, positions=320, diffusion=diffusion)
        path = (ckpt / attention if attention else tmp_path / "ar") / "agree-256"  # AR models: <ar-ckpt>/<task>
        orbax_checkpoint.save(path, transformer.init_params(cfg, jax.random.PRNGKey(0)), cfg, {})
    out = tmp_path / "eval"
    assert cli.main(["eval", "dllm", "--workloads", "long,ar", "--models", "bidirectional", "--ckpt", str(ckpt),
                     "--ar-ckpt", str(tmp_path / "ar"), "--tasks", "agree-256", "--long-n", "2", "--batch", "2",
                     "--n1", "1", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [(r["model"], r["setting"]) for r in rows] == [
        ("bidirectional", "llada 1 tok/step"), ("bidirectional", "llada 1 tok/step dual"),
        ("bidirectional", "threshold 0.9 none"),
        ("bidirectional", "threshold 0.9 prefix"), ("bidirectional", "threshold 0.9 dual"), ("causal", "ar greedy")]
    assert all(r["workload"] == "long" and r["task"] == "agree-256" and r["n"] == 2 for r in rows)
    assert rows[0]["nfe_per_token"] == pytest.approx(1.0) and rows[-1]["nfe_per_token"] == pytest.approx(1.0)
    assert (tmp_path / "eval_long.png").stat().st_size > 0


def test_an_unknown_task_is_refused_before_any_model_loads(capsys):
    assert cli.main(["eval", "dllm", "--tasks", "copy,fill-1024"]) == 2
    assert "unknown task 'fill-1024'" in capsys.readouterr().err
