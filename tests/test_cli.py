"""`pdx` CLI end to end on a tiny GGUF model (its own tokenizer, random weights)."""

import json

import pytest

from pdx import cli
from pdx.decoding import ar
from pdx.model import load_model
from tests.io.gguf_writer import write_tiny_llama


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return str(write_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny.gguf"))


def test_generate_json_matches_library(gguf_path, capsys):
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "ABC", "--prompt", "DE", "--max-new-tokens", "6",
                     "--format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["ABC", "DE"]
    model = load_model(gguf_path)
    for r in lines:
        expected = ar.generate(model, [model.tokenizer.encode(r["prompt"])], max_new_tokens=6).row(0)
        assert r["token_ids"] == expected and r["num_new_tokens"] == len(expected)
        assert set(r) >= {"text", "forward_passes", "prefill_s", "decode_s", "tokens_per_s"}


def test_generate_text_streams(gguf_path, capsys):
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "ABC", "--max-new-tokens", "6",
                     "--option", "stop_token_ids=[]"]) == 0
    out = capsys.readouterr().out
    model = load_model(gguf_path)
    ids = ar.generate(model, [[0, 1, 2]], max_new_tokens=6, stop_token_ids=[]).row(0)
    assert out == model.tokenizer.decode(ids) + "\n"


def test_prompt_file_jsonl(gguf_path, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "AB"}\n"CD"\n')
    assert cli.main(["generate", "--model", gguf_path, "--prompt-file", str(f), "--max-new-tokens", "3",
                     "--format", "json", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    assert [json.loads(x)["prompt"] for x in capsys.readouterr().out.splitlines()] == ["AB", "CD"]


def test_strategies_lists_ar(capsys):
    assert cli.main(["strategies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ar ") for line in lines) and lines == sorted(lines)  # one per strategy, by name


@pytest.mark.parametrize("argv, message", [
    (["generate", "--strategy", "nope", "--prompt", "x"], "unknown strategy 'nope'"),
    (["generate", "--prompt-file", "/nonexistent.txt"], "prompt file not found"),
    (["generate"], "give a prompt"),
    (["generate", "--prompt", "x", "--option", "novalue"], "key=value"),
    (["bench", "nothing-here"], "no bench named 'nothing-here'"),
    (["train", "nothing-here"], "no train named 'nothing-here'"),
    (["train", "code_dllm", "--model", "ar", "--data", "/nonexistent-pdx-data"], "does not exist"),
])
def test_errors_exit_2_with_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_sampling_option_is_reported(gguf_path, capsys):
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "AB", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["spec-pld", "spec-layerskip"])
def test_speculative_strategies_match_ar(gguf_path, strategy, capsys):
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "ABCABCAB", "--max-new-tokens", "8",
                     "--format", "json", "--strategy", strategy, "--option", "k=3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "ABCABCAB", "--max-new-tokens", "8",
                     "--format", "json"]) == 0
    assert spec["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
    assert spec["strategy"] == strategy


def test_spec_draft_needs_a_draft(gguf_path, capsys):
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "AB", "--strategy", "spec-draft"]) == 2
    assert "--option draft=PATH" in capsys.readouterr().err


def _bounded_option(name: str) -> tuple[str, object]:
    """(an option of strategy `name` with a numeric bound, a value past that bound): its own options first."""
    from pdx.decoding import registry

    schema = registry.STRATEGIES[name].options
    own = [k for k in sorted(schema) if k not in registry.SAMPLING and k not in registry.DLLM]
    for key in own + ["max_new_tokens"]:
        o = schema[key]
        if o.kind in ("int", "int_list") and (o.ge is not None or o.le is not None):
            bad = o.ge - 1 if o.ge is not None else o.le + 1
            return key, [bad] if o.kind == "int_list" else bad
    raise AssertionError(f"{name} has no bounded option")


def _strategies():
    from pdx.decoding import registry

    return sorted(registry.STRATEGIES)


@pytest.mark.parametrize("strategy", _strategies())
@pytest.mark.parametrize("problem", ["unknown", "mistyped", "out_of_range", "flag"])
def test_every_strategy_rejects_bad_options_in_one_line(gguf_path, strategy, problem, capsys):
    """Checked against the strategy's schema before the model loads: exit 2, one line on stderr."""
    key, bad = _bounded_option(strategy)
    from pdx.decoding import registry

    dllm = "block_size" in registry.STRATEGIES[strategy].options  # the dLLMs take no --top-p; the others no block_size
    extra = {"unknown": ["--option", "no_such_option=1"],
             "mistyped": ["--option", f"{key}=abc"],
             "out_of_range": ["--option", f"{key}={json.dumps(bad)}"],
             "flag": ["--top-p", "0.9"] if dllm else ["--option", "block_size=4"]}[problem]
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "AB", "--strategy", strategy, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pdx: error: ")
    expect = {"unknown": "takes no option 'no_such_option'", "mistyped": f"option '{key}' must be",
              "out_of_range": f"option '{key}' must be", "flag": "takes no option"}[problem]
    assert expect in err and f"'{strategy}'" in err


def test_unsupported_pair_is_one_line(gguf_path, capsys):
    """A strategy the model's family cannot run is refused with the reason, exit 2."""
    assert cli.main(["generate", "--model", gguf_path, "--prompt", "AB", "--strategy", "llada"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not run on" in err and "masked-diffusion" in err


@pytest.mark.slow  # three fresh processes, each importing jax and compiling
def test_second_run_reads_both_caches(gguf_path, tmp_path):
    """`pdx generate` in fresh processes: the first writes converted weights and compiled programs; the
    second reads the weights (its few eager array ops differ from the converter's, so they compile once);
    the third adds nothing: every compile was a cache hit."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PDX_NO_CACHE"} | {"PDX_CACHE_DIR": str(tmp_path)}
    argv = [sys.executable, "-m", "pdx.cli", "generate", "--model", gguf_path, "--prompt", "ABC",
            "--max-new-tokens", "4", "--format", "json"]
    outs, counts = [], []
    for _ in range(3):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outs.append(json.loads(done.stdout)["token_ids"])
        counts.append((len(os.listdir(tmp_path / "weights")), len(os.listdir(tmp_path / "xla"))))
    assert outs[0] == outs[1] == outs[2]
    assert [c[0] for c in counts] == [1, 1, 1] and counts[0][1] >= 2 and counts[2][1] == counts[1][1]
    no_cache = subprocess.run(argv + ["--no-cache"], env=env | {"PDX_CACHE_DIR": str(tmp_path / "unused")},
                              capture_output=True, text=True, timeout=300)
    assert no_cache.returncode == 0 and not (tmp_path / "unused").exists()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "AB"', "p.jsonl:2: not valid JSON"),
    ('{"text": "AB"}', 'p.jsonl:2: expected a JSON string or an object with a string "prompt"'),
    ('{"prompt": 3}', 'p.jsonl:2: expected a JSON string'),
])
def test_bad_jsonl_line_is_one_line_exit_2(gguf_path, tmp_path, capsys, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text(f'"fine"\n{line}\n')
    assert cli.main(["generate", "--model", gguf_path, "--prompt-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_unknown_model_type_names_every_family(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("'gpt_bigcode'", "mamba2", "phi4flash", "llada", "Dream", "GGUF"))


@pytest.mark.parametrize("kind, listed, name", [("bench", "ar, attention", "commits"), ("eval", "dllm", "dllm"),
                                                ("train", "code_dllm, draft_heads, sambay, tiny_ar, tiny_dllm",
                                                 "tiny_dllm")])
def test_script_kinds_list_their_scripts_and_scripts_name_themselves(kind, listed, name, capsys):
    with pytest.raises(SystemExit):
        cli.main([kind, "--help"])
    assert listed in " ".join(capsys.readouterr().out.split())  # argparse wraps the list
    with pytest.raises(SystemExit):
        cli.main([kind, name, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: pdx {kind} {name}")


def test_schema_refuses_what_was_silently_accepted():
    """`adaptive=yes` was taken as truthy; a speculative strategy's unknown option listed only AR's options."""
    from pdx.decoding import registry
    from pdx.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="option 'adaptive' must be true or false"):
        registry.validate("spec-pld", {"adaptive": "yes"})
    with pytest.raises(InvalidInputError, match="max_ngram") as e:
        registry.validate("spec-pld", {"window": 3})
    assert "temperature" in str(e.value) and "k," in str(e.value)


@pytest.mark.slow
def test_bench_runs_from_a_regular_install(tmp_path):
    """A non-editable install ships scripts/ as pdx.scripts, so `pdx bench` finds its benchmarks there."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), root], check=True)
    probe = ("import pdx.scripts, pdx.cli as c; print(pdx.scripts.__file__); print(','.join(c._available('bench')));"
             "c.main(['bench', 'commits', '--help'])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    where, names, usage = out.stdout.split("\n", 2)
    assert where.startswith(str(target)) and "ar" in names.split(",") and "commits" in names.split(",")
    assert usage.startswith("usage: pdx bench commits")
